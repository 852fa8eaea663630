"""The server's side of a federation, without any transport: the round function, the global model,
checkpoints, the run directory, evaluation, the message size guard and fault injection.

``florist.flower`` moves messages and calls into here; the in-process bench calls the same code.
Nothing in this package imports Flower (``tests/unit/test_purity.py``).
"""
