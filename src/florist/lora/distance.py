"""One relative error for every comparison of updates (benchmarks, demo, tests, reliability).

    relative_error(got, want) = sqrt( sum_k ||got_k - want_k||_F^2 / sum_k ||want_k||_F^2 )

over the modules ``k`` of ``want`` (one tensor counts as one module), in float64. Compare products
``B @ A`` (or merged weights), never factors: SVD factors are defined up to sign and rotation.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor


def relative_error(got: Mapping[str, Tensor] | Tensor, want: Mapping[str, Tensor] | Tensor) -> float:
    """``sqrt(sum ||got - want||^2 / sum ||want||^2)`` over ``want``'s modules; 0 when both are zero."""
    if isinstance(want, Tensor):
        assert isinstance(got, Tensor)
        got, want = {"": got}, {"": want}
    assert not isinstance(got, Tensor)
    num = sum(float((got[k].double() - w.double()).square().sum()) for k, w in want.items())
    den = sum(float(w.double().square().sum()) for w in want.values())
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return float((num / den) ** 0.5)
