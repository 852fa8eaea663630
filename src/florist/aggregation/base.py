"""What every aggregator shares: the client protocol, the result type, the base class and registry."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor

from florist.errors import ConfigError
from florist.lora.update import ClientUpdate, LoraFactors
from florist.lora.validation import client_weights, validate_updates


class ClientProtocol(str, Enum):
    """What a client does with what the server sends it."""

    MERGE_AND_RESTART = "merge_and_restart"  # W0 += B_g A_g, then a fresh LoRA of its own rank
    CONTINUE_GLOBAL = "continue_global"  # load the global A, B (its own rank's slice) and keep training
    CONTINUE_PER_CLIENT = "continue_per_client"  # load its own per-client factors and keep training
    FROZEN_SHARED_A = "frozen_shared_a"  # A is frozen and shared (seeded); load the global B
    # W0 += B_g A_g, then move the leading r_k columns of (B_g, A_g) back out of W0 into the LoRA and
    # keep training from them (FedEx-LoRA: the global update leads with the averaged adapter)
    MERGE_AND_CONTINUE = "merge_and_continue"
    # A is the server's (a seeded draw in round 1, then re-factorised by the server every round): load
    # the global A and B, train only B, upload only B (FedSVD)
    TRAIN_B_ON_SERVER_A = "train_b_on_server_a"
    # B and A are a frozen basis the server sets once from the clients' summed gradient (round 0);
    # clients train only the r x r core R between them, starting from the global core, and send only R
    # (Fed-SB)
    TRAIN_CORE = "train_core"

    @property
    def merges(self) -> bool:
        """Do clients merge every round's global update into their base weights, in round order?"""
        return self in (ClientProtocol.MERGE_AND_RESTART, ClientProtocol.MERGE_AND_CONTINUE)


@dataclass(frozen=True)
class AggregationResult:
    """The outcome of one aggregation.

    Attributes
    ----------
    method : str
        Registry name of the aggregator.
    protocol : ClientProtocol
        What clients do with the download.
    global_update : dict[str, LoraFactors]
        Effective factors (scaling 1.0) of the global update: ``delta W_g = B @ A`` per module.
    client_ids : tuple[str, ...]
        Clients aggregated, sorted.
    weights : dict[str, float]
        ``p_k`` per client.
    per_client : dict[str, dict[str, LoraFactors]] | None
        When clients receive different factors (FlexLoRA; FedIT and FFA with mixed ranks),
        what each client downloads; ``None`` when every client downloads ``global_update``.
    energy_kept : dict[str, float] | None
        Fraction of the exact aggregate's energy that ``global_update`` holds, per module,
        when the method computes the exact aggregate's spectrum.
    spectra : dict[str, Tensor] | None
        Singular values of the exact aggregate ``sum_k p_k delta W_k`` per module, when computed.
    residual : dict[str, LoraFactors] | None
        FLoRIST with ``aggregation.error_feedback``: what the rank cut left out of this round's
        aggregate (its leading tail directions), kept by the server and added to the next round's
        before its SVD; never sent. None otherwise.
    sends_a : bool
        False when the download carries only B (FFA-LoRA: A is frozen and shared by seed); whether
        uploads carry A is the protocol's (``florist.aggregation.protocols``, ``uploads_a``).
    seconds : float
        Server wall time of the aggregation.
    """

    method: str
    protocol: ClientProtocol
    global_update: dict[str, LoraFactors]
    client_ids: tuple[str, ...] = ()
    weights: dict[str, float] = field(default_factory=dict)
    per_client: dict[str, dict[str, LoraFactors]] | None = None
    energy_kept: dict[str, float] | None = None
    spectra: dict[str, Tensor] | None = None
    residual: dict[str, LoraFactors] | None = None
    sends_a: bool = True
    seconds: float = 0.0

    @property
    def ranks(self) -> dict[str, int]:
        """Rank of the global update per module."""
        return {name: f.rank for name, f in self.global_update.items()}

    def download(self, client_id: str) -> dict[str, LoraFactors]:
        """The factors ``client_id`` receives."""
        if self.per_client is None:
            return self.global_update
        if client_id not in self.per_client:
            raise KeyError(f"no download for client {client_id!r}; known: {sorted(self.per_client)}")
        return self.per_client[client_id]

    def continue_from(self, client_id: str, rank: int) -> dict[str, LoraFactors]:
        """What a continue-protocol client of ``rank`` starts its next round from: its own entry,
        else the leading ``rank`` components of the global update (zero-padded if it has fewer)."""
        if self.per_client is not None and client_id in self.per_client:
            return self.per_client[client_id]
        return {name: f.leading(rank, pad=True) for name, f in self.global_update.items()}

    def is_finite(self) -> bool:
        """Every factor of the global update and of every per-client download is finite."""
        modules = list(self.global_update.values())
        for per in (self.per_client or {}).values():
            modules += list(per.values())
        return all(bool(torch.isfinite(t).all()) for f in modules for t in f.tensors())


class Aggregator(ABC):
    """Base class: validation, sorting by client id, weights and timing are done here once."""

    name: ClassVar[str]
    protocol: ClassVar[ClientProtocol]
    exact: ClassVar[bool]  # does global_update equal sum_k p_k delta W_k (before any truncation)?
    # does the result depend on each client's factors only through B_k A_k? Then a client may send
    # any factorisation of its update (uplink thresholding, warm-start corrections)
    products_only: ClassVar[bool]
    label: ClassVar[str]  # how reports name it ("FLoRIST", "FedIT", ...)
    rank_policy: ClassVar[bool] = False  # does it take a rank policy (tau, fixed rank, byte budget)?
    dtype: torch.dtype

    @classmethod
    def download_rank(cls, ranks: Sequence[int], m: int, n: int, fixed_rank: int | None = None) -> int:
        """Largest rank one client downloads for an (m, n) module when clients have ``ranks``: an
        upper bound where the data decides (``download_is_bound``). Default: the largest client rank."""
        return max(ranks)

    @classmethod
    def download_is_bound(cls, fixed_rank: int | None = None, budget_mb: float | None = None) -> bool:
        """True when ``download_rank`` is only an upper bound (the kept rank depends on the data)."""
        return False

    @classmethod
    def sends_a(cls) -> bool:
        """Do downloads carry A (False when A is frozen and shared by seed)? The protocol says."""
        from florist.aggregation.protocols import protocol_of  # protocols builds on this module

        return protocol_of(cls.protocol).sends_a

    @classmethod
    def uploads_a(cls) -> bool:
        """Do uploads carry A (False when the server knows it: FFA-LoRA's seed, FedSVD's own A)?"""
        from florist.aggregation.protocols import protocol_of

        return protocol_of(cls.protocol).uploads_a

    def initial(
        self, gradients: Sequence[Mapping[str, Tensor]], rank: int, lr: float, wire: str = "float32"
    ) -> AggregationResult:
        """Round 0, for protocols that need one (``ClientRules.needs_init``): the run's starting
        adapter from the clients' summed gradients of their base weights."""
        raise TypeError(f"{self.name} has no round 0")

    def aggregate(self, updates: Sequence[ClientUpdate], *, round: int | None = None) -> AggregationResult:
        """Validate ``updates``, sort them by client id and aggregate them."""
        if self.dtype not in (torch.float32, torch.float64):
            raise ConfigError(f"compute dtype must be float32 or float64, got {self.dtype}")
        ordered = validate_updates(updates, round=round)
        weights = client_weights(ordered)
        start = time.perf_counter()
        result = self._aggregate(ordered, weights)
        return _with_meta(result, ordered, weights, time.perf_counter() - start)

    @abstractmethod
    def _aggregate(self, updates: Sequence[ClientUpdate], weights: Tensor) -> AggregationResult:
        """Aggregate validated updates, sorted by client id, with weights ``p_k`` (float64)."""


def _with_meta(
    r: AggregationResult, updates: Sequence[ClientUpdate], weights: Tensor, seconds: float
) -> AggregationResult:
    ids = tuple(u.client_id for u in updates)
    w = dict(zip(ids, weights.tolist(), strict=True))
    return replace(r, client_ids=ids, weights=w, seconds=seconds)


def module_names(updates: Sequence[ClientUpdate]) -> list[str]:
    """Adapted modules, sorted (validation guarantees every client has the same set)."""
    return sorted(updates[0].modules)


def per_client_slices(
    updates: Sequence[ClientUpdate], global_update: Mapping[str, LoraFactors]
) -> dict[str, dict[str, LoraFactors]] | None:
    """Each client's own-rank slice of a zero-padded global update; None when ranks all agree."""
    if all(u.ranks == updates[0].ranks for u in updates):
        return None
    return {
        u.client_id: {name: g.leading(u.modules[name].rank) for name, g in global_update.items()}
        for u in updates
    }


_REGISTRY: dict[str, type[Aggregator]] = {}
A = TypeVar("A", bound=type[Aggregator])


def register(name: str) -> Callable[[A], A]:
    """Class decorator: make an aggregator available under ``name``."""

    def wrap(cls: A) -> A:
        if name in _REGISTRY:
            raise ValueError(f"aggregator {name!r} is already registered")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def available() -> list[str]:
    """Registered aggregator names."""
    return sorted(_REGISTRY)


def aggregator_class(name: str) -> type[Aggregator]:
    """The class registered as ``name`` (its protocol and properties without building one)."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown aggregation method {name!r}; choose one of {available()}")
    return _REGISTRY[name]


def make_aggregator(name: str, **options: Any) -> Aggregator:
    """Build the aggregator registered as ``name`` with ``options``."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown aggregation method {name!r}; choose one of {available()}")
    try:
        return _REGISTRY[name](**options)
    except TypeError as err:
        raise ConfigError(f"bad options for method {name!r}: {err}") from err
