"""Client protocols as objects: the one place that says what each protocol means on both sides.

An aggregator declares its protocol (``ClientProtocol``, a name); ``protocol_of`` turns the name into
one of the objects below, which say

- on a client (``florist.client.local.LocalClient`` calls them; the client does not branch):
  how it starts a fresh LoRA, what it does with a download, what a warm start continues from;
- on the server (``florist.server.round``, the server's model, the bench, the Flower strategy and node):
  what client k receives after a round, what a round's change is, how the server's model folds a
  round, what the run's whole adapter is, where a client's round began (for the round error);
- which options fit it (warm start, norm clipping) and whether round 1 can be shared.

    MergeAndRestart    florist, flora      W0 += B_g A_g; a fresh LoRA (or, with warm start, the
                                           leading r_k directions of the global update)
    MergeAndContinue   fedex               W0 += B_g A_g; continue from the leading r_k columns
    Continue           fedit, flexlora     load the download (own slice / own truncation), continue
    FrozenSharedA      ffa                 A frozen, one seeded draw; load the global B
    TrainBOnServerA    fedsvd              A frozen and the server's (seeded in round 1, then the
                                           right singular vectors of the aggregate); load A and B,
                                           train B, upload only B
    TrainCore          fedsb               B and A a frozen basis set in round 0 from the clients'
                                           summed gradient; load and train only the r x r core R

A new protocol is a class here plus its aggregator; nothing else needs to know its name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import ClassVar, Protocol

from torch import Tensor

from florist.aggregation.base import AggregationResult, ClientProtocol
from florist.aggregation.lowrank import leading_columns, warm_parts, warm_source, without_warm_part
from florist.errors import InvalidUpdate
from florist.lora import ClientUpdate, LoraFactors
from florist.lora.seeded import seeded_a
from florist.lora.update import sum_of_rounds

Modules = Mapping[str, LoraFactors]


class ClientSide(Protocol):
    """What a protocol does on a client: the operations ``LocalClient`` offers it."""

    def merge(self, update: Modules) -> None: ...  # W0 += B A (a warm split undone first)
    def fresh_lora(self, round: int, policy: str, freeze_a: bool = False) -> None: ...
    def load(self, factors: Modules, b_only: bool = False) -> None: ...  # into the LoRA, in place
    def hold_warm(self, download: Modules, always: bool = False) -> None: ...  # warm-start at next fit


class ClientRules:
    """A client protocol. Subclasses set the class attributes and override what differs."""

    kind: ClassVar[ClientProtocol]
    merges: ClassVar[bool] = False  # clients merge every round in order: catch-up replays all missed
    sends_a: ClassVar[bool] = True  # downloads carry A (not when frozen and shared by seed)
    uploads_a: ClassVar[bool] = True  # uploads carry A (not when the server knows it: ``upload_a``)
    fits_warm_start: ClassVar[bool] = False  # lora.warm_start can apply
    fits_clip: ClassVar[bool] = True  # aggregation.clip is defined (the upload is the round's change)
    own_init: ClassVar[bool] = False  # lora.init applies; else every client starts from the shared draw
    # a round 0 before training: clients send the summed gradient of their base weights and the
    # server answers with the run's starting adapter (``florist.aggregation.fedsb``)
    needs_init: ClassVar[bool] = False

    # ------------------------------------------------------------------ client side

    def init_policy(self, configured: str) -> str:
        """The init policy in force (continue protocols always start from the shared draw: FedAvg)."""
        return configured if self.own_init else "shared"

    def fresh(self, client: ClientSide, round: int, configured: str) -> None:
        """A fresh LoRA before round ``round + 1``: A seeded, B = 0."""
        client.fresh_lora(round, self.init_policy(configured))

    def receive(self, client: ClientSide, download: Modules, round: int, configured: str) -> None:
        """Apply what the server sent after ``round``."""
        client.load(download)

    def warm_part(self, download: Modules, rank: int, split: str) -> dict[str, LoraFactors]:
        """What a client of ``rank`` continues from after merging ``download`` (merge protocols)."""
        raise TypeError(f"{self.kind.value} clients do not warm-start")

    # ------------------------------------------------------------------ server side

    def download(self, result: AggregationResult, client_id: str, rank: int) -> dict[str, LoraFactors]:
        """What client ``client_id`` (LoRA rank ``rank``) receives after the round of ``result``."""
        return result.continue_from(client_id, rank)

    def deltas(
        self,
        uploads: Sequence[ClientUpdate],
        history: Sequence[AggregationResult],
        ranks: Mapping[str, int],
        warm_from: str | None = None,
    ) -> list[ClientUpdate]:
        """What the clients changed this round, from their uploads (``history``: results sent so far;
        ``warm_from``: the warm start's source when uploads hold a warm part, else None)."""
        return list(uploads)

    def round_start(self, sent: Sequence[AggregationResult]) -> Modules | None:
        """Where a client's model began this round beyond the merged base: the adapter it continued
        from (continue protocols), None for merge protocols (their change starts at B = 0)."""
        return sent[-1].global_update if sent else None

    def final(self, history: Sequence[Modules]) -> dict[str, LoraFactors]:
        """The run's whole update against the base model, as one adapter."""
        return dict(history[-1])

    def round_one_key(self, init: str) -> str | None:
        """Which round-1 uploads the bench can share (None: its own)."""
        return self.init_policy(init)

    def upload_a(self, sent: Sequence[AggregationResult], seed: int, rows: int, name: str, n: int) -> Tensor:
        """The A of module ``name`` (``rows`` x ``n``) that B-only uploads were trained against, known
        to the server without being sent (only for protocols with ``uploads_a = False``); a client
        of rank r used its leading r rows. ``sent``: the results sent so far."""
        raise TypeError(f"{self.kind.value} clients upload A")


class MergeAndRestart(ClientRules):
    kind = ClientProtocol.MERGE_AND_RESTART
    merges = True
    fits_warm_start = True
    own_init = True

    def receive(self, client: ClientSide, download: Modules, round: int, configured: str) -> None:
        client.merge(download)
        self.fresh(client, round, configured)
        client.hold_warm(download)  # only with lora.warm_start

    def warm_part(self, download: Modules, rank: int, split: str) -> dict[str, LoraFactors]:
        return warm_parts(download, rank, split)

    def download(self, result: AggregationResult, client_id: str, rank: int) -> dict[str, LoraFactors]:
        return result.global_update

    def deltas(
        self,
        uploads: Sequence[ClientUpdate],
        history: Sequence[AggregationResult],
        ranks: Mapping[str, int],
        warm_from: str | None = None,
    ) -> list[ClientUpdate]:
        """With a warm start in the uploads, each upload less its warm part, split from the last
        global or from all of them (``warm_from``, "last" or "accumulated")."""
        if not history or warm_from is None:
            return list(uploads)
        source = warm_source([r.global_update for r in history], warm_from)
        warm = {r: warm_parts(source, r) for r in {ranks[u.client_id] for u in uploads}}  # one SVD per rank
        return [without_warm_part(u, warm[ranks[u.client_id]]) for u in uploads]

    def round_start(self, sent: Sequence[AggregationResult]) -> Modules | None:
        return None

    def final(self, history: Sequence[Modules]) -> dict[str, LoraFactors]:
        return sum_of_rounds(history)


class MergeAndContinue(MergeAndRestart):
    """FedEx-LoRA: merge the global update, then continue from its leading r_k columns (the
    client's slice of the averaged factors)."""

    kind = ClientProtocol.MERGE_AND_CONTINUE
    fits_warm_start = False  # it continues by construction
    fits_clip = False  # the upload is not the change (the averages it continued from are in it)
    own_init = False

    def receive(self, client: ClientSide, download: Modules, round: int, configured: str) -> None:
        client.merge(download)
        self.fresh(client, round, configured)
        client.hold_warm(download, always=True)

    def warm_part(self, download: Modules, rank: int, split: str) -> dict[str, LoraFactors]:
        return leading_columns(download, rank)

    def deltas(
        self,
        uploads: Sequence[ClientUpdate],
        history: Sequence[AggregationResult],
        ranks: Mapping[str, int],
        warm_from: str | None = None,
    ) -> list[ClientUpdate]:
        """Each upload with the slice it continued from (``ClientUpdate.start``)."""
        if not history:
            return list(uploads)
        g = history[-1].global_update
        return [replace(u, start=leading_columns(g, ranks[u.client_id])) for u in uploads]


class Continue(ClientRules):
    """FedIT (its rank's slice of the global factors) and FlexLoRA (its own truncation)."""

    def __init__(self, kind: ClientProtocol) -> None:
        self.kind = kind  # type: ignore[misc]


class FrozenSharedA(ClientRules):
    """FFA-LoRA: A is one seeded draw for the whole run, frozen; only B trains and travels."""

    kind = ClientProtocol.FROZEN_SHARED_A
    sends_a = False
    uploads_a = False

    def fresh(self, client: ClientSide, round: int, configured: str) -> None:
        client.fresh_lora(0, "frozen", freeze_a=True)

    def receive(self, client: ClientSide, download: Modules, round: int, configured: str) -> None:
        client.load(download, b_only=True)

    def round_one_key(self, init: str) -> str | None:
        return None

    def upload_a(self, sent: Sequence[AggregationResult], seed: int, rows: int, name: str, n: int) -> Tensor:
        return seeded_a(seed, name, rows, n)


class TrainBOnServerA(ClientRules):
    """FedSVD: A is frozen and chosen by the server, the seeded draw in round 1 and afterwards the
    right singular vectors of the aggregate (``florist.aggregation.fedsvd``); a client loads the global
    A and B (its rank's leading components), trains B and uploads only B."""

    kind = ClientProtocol.TRAIN_B_ON_SERVER_A
    uploads_a = False

    def fresh(self, client: ClientSide, round: int, configured: str) -> None:
        client.fresh_lora(0, "frozen", freeze_a=True)

    def round_one_key(self, init: str) -> str | None:
        return None

    def upload_a(self, sent: Sequence[AggregationResult], seed: int, rows: int, name: str, n: int) -> Tensor:
        if not sent:
            return seeded_a(seed, name, rows, n)
        A = sent[-1].global_update[name].A  # what every client loaded (its leading rows)
        if A.shape[1] != n:
            raise ValueError(f"module {name!r}: the server's A has {A.shape[1]} columns, not {n}")
        return A


class TrainCore(ClientRules):
    """Fed-SB: B and A are the basis the server set in round 0 (LoRA-SB's initialisation from the
    clients' summed gradient), frozen; a client loads the global core R and trains only R. Uploads
    and downloads carry R alone (``LoraFactors.core``); the server puts its own basis back around a
    client's R, so no client can change the basis."""

    kind = ClientProtocol.TRAIN_CORE
    needs_init = True
    fits_clip = False  # the upload is the whole adapter's core, not the round's change

    def fresh(self, client: ClientSide, round: int, configured: str) -> None:
        client.fresh_lora(0, "frozen", freeze_a=True)  # B = 0 until round 0's basis arrives

    def round_one_key(self, init: str) -> str | None:
        return None

    def download(self, result: AggregationResult, client_id: str, rank: int) -> dict[str, LoraFactors]:
        return result.global_update

    def deltas(
        self,
        uploads: Sequence[ClientUpdate],
        history: Sequence[AggregationResult],
        ranks: Mapping[str, int],
        warm_from: str | None = None,
    ) -> list[ClientUpdate]:
        """Each upload's core between the server's basis (what the last result sent)."""
        basis = history[-1].global_update
        out = []
        for u in uploads:
            modules = {}
            for name, f in u.modules.items():
                if f.core is None or name not in basis:
                    raise InvalidUpdate(u.client_id, "a Fed-SB upload carries the core R", module=name)
                modules[name] = LoraFactors(A=basis[name].A, B=basis[name].B, core=f.core, scaling=f.scaling)
            out.append(replace(u, modules=modules))
        return out


_RULES: dict[ClientProtocol, ClientRules] = {
    ClientProtocol.MERGE_AND_RESTART: MergeAndRestart(),
    ClientProtocol.MERGE_AND_CONTINUE: MergeAndContinue(),
    ClientProtocol.CONTINUE_GLOBAL: Continue(ClientProtocol.CONTINUE_GLOBAL),
    ClientProtocol.CONTINUE_PER_CLIENT: Continue(ClientProtocol.CONTINUE_PER_CLIENT),
    ClientProtocol.FROZEN_SHARED_A: FrozenSharedA(),
    ClientProtocol.TRAIN_B_ON_SERVER_A: TrainBOnServerA(),
    ClientProtocol.TRAIN_CORE: TrainCore(),
}


def protocol_of(kind: ClientProtocol | ClientRules) -> ClientRules:
    """The rules of a protocol name (an object passes through)."""
    return kind if isinstance(kind, ClientRules) else _RULES[kind]
