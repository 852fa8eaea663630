"""Send a round's messages and collect the replies that arrive before its deadline.

Flower's ``Grid.send_and_receive`` forgets the messages whose replies did not come in time, so a
straggler's late reply would sit in the SuperLink unseen. ``Exchange`` keeps those message ids;
every later pull also asks for them, and a late reply is logged and discarded (it was trained on
an old global model and its round is closed).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from flwr.app import Message
from flwr.serverapp import Grid

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Late:
    """A reply that arrived after its round was closed."""

    round: int
    node_id: int
    arrived_in: str  # what the server was doing when it came: "round 3", "sync"


@dataclass
class Exchange:
    """Push/pull with a deadline, remembering unanswered messages of earlier rounds."""

    grid: Grid
    poll_seconds: float = 0.1
    outstanding: dict[str, tuple[int, int]] = field(default_factory=dict)  # message id -> (round, node)
    late: list[Late] = field(default_factory=list)

    def send_and_receive(
        self, messages: Sequence[Message], round: int, timeout: float | None, phase: str
    ) -> tuple[list[Message], list[int]]:
        """Replies that came within ``timeout`` seconds, and the node ids that did not answer in time."""
        ids = list(self.grid.push_messages(messages))
        pending = {mid: (round, m.metadata.dst_node_id) for mid, m in zip(ids, messages, strict=True)}
        replies: list[Message] = []
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            replies += self._pull(pending, phase)
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(self.poll_seconds)
        self.outstanding.update(pending)
        return replies, sorted(node for _, node in pending.values())

    def drain(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for replies still owed, so each is logged as late, not lost."""
        deadline = time.monotonic() + timeout
        while self.outstanding and time.monotonic() < deadline:
            self._pull({}, "the end of the run")
            time.sleep(self.poll_seconds)
        if self.outstanding:
            log.warning(
                "%d message(s) never answered: %s", len(self.outstanding), sorted(self.outstanding.values())
            )

    def _pull(self, pending: dict[str, tuple[int, int]], phase: str) -> list[Message]:
        wanted = [*pending, *self.outstanding]
        if not wanted:
            return []
        fresh = []
        for reply in self.grid.pull_messages(wanted):
            mid = reply.metadata.reply_to_message_id
            if pending.pop(mid, None) is not None:
                fresh.append(reply)
            elif (old := self.outstanding.pop(mid, None)) is not None:
                self.late.append(Late(old[0], old[1], phase))
                log.warning(
                    "late reply from node %d for round %d arrived during %s: discarded", old[1], old[0], phase
                )
        return fresh
