"""Adversarial tests (issue 12): what a careless or hostile caller can pass.

One module per category: (a) ``test_api_arguments``, (b)
``test_constructor_kwargs``, (c) ``test_files``, (d) ``test_forward_inputs``,
(e) ``test_concurrency``, (f) ``test_modes``, (g) ``test_cli_arguments``, and
``test_properties`` (hypothesis). A case that fails on today's code carries a
strict ``xfail`` whose reason starts with ``BUG:``; once fixed it XPASSes, which
fails the run until the mark is removed. Count cases and open bugs with::

    pytest tests/adversarial -m "slow or not slow" -q -rx | grep -c "XFAIL.*BUG"
"""
