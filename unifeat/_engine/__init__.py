"""The zoo-independent engine under every backend.

Adapters (``unifeat._backends``) know their model zoo: names, building,
checkpoints, native switches, per-family tables. Everything else lives here,
once, and imports no adapter:

* :mod:`.levels`: the one level type, the default-selection policy and the
  tokens -> map rule;
* :mod:`.graph`: levels found on a traced FX graph, and the graph runner;
* :mod:`.hooks`: levels found with forward hooks on a module's block list, and
  the hook runner;
* :mod:`.native`: the pass-through runner for libraries with their own
  ``forward_intermediates`` (timm, open_clip);
* :mod:`.dilation`: ``output_stride`` by dilating strided convs and pools;
* :mod:`.model`: the one :class:`~unifeat.FeatureModel`, whatever the runner;
* :mod:`.layout`: what a finder hands over — levels, metadata and how to make
  the runner — plus the ``output_stride`` loop every finder shares.

Zoo hints (head modules, input size, calling conventions) come in as data.
"""
