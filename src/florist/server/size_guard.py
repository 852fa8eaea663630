"""Message sizes, estimated before anything is sent, against ``federation.max_message_mb``.

Per adapted module of shape (m, n), with b bytes per element on the wire (4: float32, 2: bf16/fp16):
    upload of client k       (r_k n + m r_k) * b        (FFA-LoRA: m r_k * b, B only)
    download, FLoRA          R (m + n) * b,  R = sum_k r_k   the whole stack, every client
    download, FLoRIST        p (m + n) * b,  p <= min(R, m, n); at tau = 1 p is the full rank
    download, FedIT/FlexLoRA r_k (m + n) * b (each client its own rank)
    download, FFA-LoRA       m r_k * b
The estimate for FLoRIST with an energy threshold is its bound (tau = 1): the server then checks
each actual message before it sends it. The classic failure is FLoRA stacking many clients at 7B
shapes: 64 clients of rank 64 on q_proj and v_proj of Llama-2-7B make a 8.6 GB download per client.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from florist.aggregation.base import aggregator_class
from florist.errors import ConfigError

BYTES = 4  # float32 on the wire, the default
MB = 1e6


class MessageTooLarge(ConfigError):
    """A message would exceed ``federation.max_message_mb``."""


@dataclass(frozen=True)
class SizeEstimate:
    upload: int  # the largest client upload, bytes
    download: int  # the largest download of one round, bytes
    download_is_bound: bool  # True when the real size depends on the data (FLoRIST with tau)


def estimate(
    method: str,
    shapes: Mapping[str, tuple[int, int]],
    ranks: Sequence[int],
    fixed_rank: int | None = None,
    budget_mb: float | None = None,
    bytes_per_element: int = BYTES,
) -> SizeEstimate:
    """Largest upload and download of one round for ``method`` with client ``ranks``.

    ``fixed_rank`` and ``budget_mb`` are FLoRIST's other rank policies (aggregation.rank, .budget_mb).
    """
    cls = aggregator_class(method)
    r_max, up_a, down_a = max(ranks), cls.uploads_a(), cls.sends_a()
    up = sum(r_max * ((m + n) if up_a else m) for m, n in shapes.values()) * bytes_per_element
    down = sum(
        cls.download_rank(ranks, m, n, fixed_rank) * ((m + n) if down_a else m) for m, n in shapes.values()
    )
    down *= bytes_per_element
    if cls.rank_policy and budget_mb is not None:
        down = min(down, int(budget_mb * MB))
    bound = cls.download_is_bound(fixed_rank, budget_mb)
    return SizeEstimate(up, down, bound)


def check_estimate(est: SizeEstimate, method: str, limit_mb: float, num_clients: int) -> str | None:
    """Raise ``MessageTooLarge`` for a configuration whose messages cannot fit; a warning text for a bound."""
    limit = limit_mb * MB
    if est.upload > limit:
        raise MessageTooLarge(
            f"a client upload would be {est.upload / MB:,.1f} MB, "
            f"above federation.max_message_mb = {limit_mb:g}"
        )
    if est.download <= limit:
        return None
    text = (
        f"{method} with {num_clients} clients: a download would be {est.download / MB:,.1f} MB "
        f"(estimate), above federation.max_message_mb = {limit_mb:g}"
    )
    if est.download_is_bound:
        return text + " at tau = 1; each message is checked before it is sent"
    raise MessageTooLarge(text + "; use fewer clients, lower ranks, or florist with tau < 1 or a budget")


def check_message(size: int, limit_mb: float, what: str) -> None:
    """Refuse to send one message of ``size`` bytes above the limit; ``what`` names it."""
    if size > limit_mb * MB:
        raise MessageTooLarge(
            f"{what} would be {size / MB:,.1f} MB, above federation.max_message_mb = {limit_mb:g}"
        )
