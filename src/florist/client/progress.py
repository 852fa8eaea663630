"""One progress bar per client and round, wherever the client runs.

In a Ray actor (``florist run``'s simulation) a plain tqdm bar reaches the terminal as one long line
prefixed ``(ClientAppActor pid=...)``; Ray's own ``tqdm_ray`` sends the bar's state to the driver,
which draws it as a normal bar. Everywhere else (a SuperNode, the bench, a test) it is plain tqdm,
drawn only on a terminal: written to a log file, every redraw would be one more line. ``run.progress
= false`` turns it off everywhere.
"""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm


def _in_ray_worker() -> bool:
    ray = sys.modules.get("ray")  # never import Ray just to ask
    if ray is None or not ray.is_initialized():
        return False
    return bool(ray.get_runtime_context().worker.mode == ray.WORKER_MODE)


class StepBar:
    """``total`` steps named ``desc``; ``step(loss)`` advances it and shows the last loss."""

    def __init__(self, total: int, desc: str, enabled: bool = True) -> None:
        self.desc, self.ray = desc, _in_ray_worker()
        self.bar: Any
        if not enabled or (not self.ray and not sys.stderr.isatty()):
            self.bar = None
        elif self.ray:
            from ray.experimental.tqdm_ray import tqdm as ray_tqdm

            self.bar = ray_tqdm(total=total, desc=desc, unit="step")
        else:
            self.bar = tqdm(total=total, desc=desc, leave=False, unit="step")

    def step(self, loss: float) -> None:
        if self.bar is None:
            return
        if self.ray:
            self.bar.set_description(f"{self.desc} loss={loss:.3f}")
        else:
            self.bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
