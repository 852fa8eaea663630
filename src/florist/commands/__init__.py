"""One module per CLI command, each with ``add_arguments(parser)`` and ``main(args)`` beside the code
it runs: run, demo, config (keys.py), aggregate, inspect, export, report, compare. ``florist.cli``
lists them; no other package imports this one (``tests/unit/test_purity.py``).

The studies' commands (``bench``, ``regime``, ``client-sweep``, ``privacy-study``) live in their
modules under ``studies/``, and ``florist deploy`` in ``deploy/command.py``.
"""
