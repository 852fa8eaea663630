"""One module per CLI command: aggregate, inspect, compare, run (and demo). ``florist.cli`` only parses
arguments and calls them; no other package imports this one (``tests/unit/test_purity.py``).

``florist bench``, ``florist regime`` and ``florist deploy`` live with their subsystems
(``bench/``, ``deploy/``).
"""
