"""Optional run tracking beside ``metrics.jsonl`` (which stays the source of truth).

``run.tensorboard = true`` writes ``RUN/tensorboard/``: per round the train loss, bytes up / down /
catch-up and cumulative bytes, the global rank, the privacy spent (``privacy/epsilon``: client-level
DP's epsilon so far; ``privacy/epsilon_max_client``: DP-SGD's worst client), and every evaluation
figure (``tensorboard --logdir RUN/tensorboard``). Needs the ``tensorboard`` package (the
``tensorboard`` extra; ``make`` installs it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from florist.errors import ConfigError


def scalars(record: Mapping[str, Any], total_bytes: int) -> dict[str, float]:
    """The numbers of one metrics.jsonl record worth a curve, by TensorBoard tag."""
    out: dict[str, float] = {}
    for key in ("train_loss", "bytes_up", "bytes_down", "bytes_catchup", "rank_total", "energy_kept_min"):
        value = record.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            out[f"round/{key}"] = float(value)
    out["round/bytes_total_cumulative"] = float(total_bytes)
    if isinstance(eps := record.get("epsilon"), (int, float)):  # client-level DP, the run so far
        out["privacy/epsilon"] = float(eps)
    client_eps = [m["epsilon"] for m in (record.get("client_metrics") or {}).values()
                  if isinstance(m, Mapping) and isinstance(m.get("epsilon"), (int, float))]  # fmt: skip
    if client_eps:  # DP-SGD: each client's own; the worst is the run's guarantee per client
        out["privacy/epsilon_max_client"] = float(max(client_eps))
    for key, value in (record.get("eval") or {}).items():
        if isinstance(value, (int, float)) and math.isfinite(value) and not key.endswith("seconds"):
            out[f"eval/{key}"] = float(value)
    return out


class TensorBoard:
    """A ``SummaryWriter`` fed with each round's record."""

    def __init__(self, path: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ConfigError(
                "run.tensorboard = true needs the tensorboard package: pip install 'florist[tensorboard]'"
            ) from err
        self.writer, self.total = SummaryWriter(log_dir=str(path)), 0

    def record(self, record: Mapping[str, Any]) -> None:
        self.total += sum(int(record.get(k) or 0) for k in ("bytes_up", "bytes_down", "bytes_catchup"))
        for tag, value in scalars(record, self.total).items():
            self.writer.add_scalar(tag, value, global_step=int(record["round"]))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
