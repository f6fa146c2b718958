"""unifeat backbones inside other frameworks' heads (docs/heads.md).

Each submodule is the integration with one framework and imports that framework
when it is imported itself; ``import unifeat`` imports none of them:

- :mod:`unifeat.integrations.transformers`: transformers' heads (UperNet,
  Mask2Former, DPT, DETR) through ``AutoBackbone``;
- :mod:`unifeat.integrations.smp`: segmentation_models_pytorch's decoders
  through its encoder registry;
- :mod:`unifeat.integrations.torchvision`: torchvision's detectors through a
  backbone with an FPN.
"""
