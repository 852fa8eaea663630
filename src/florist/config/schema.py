"""What a federated run is made of: one frozen dataclass per TOML section, validated on construction.

[model]        which causal LM, its dtype and device
[data]         the instruction data, how it is split over clients, the held-out set
[lora]         each client's adapter (one rank per client, or one for all)
[train]        each client's local budget per round (florist.client.train.TrainSettings)
[federation]   rounds, clients, participation
[aggregation]  the aggregator from the registry and its rank policy
[eval]         server-side evaluation of the global model
[run]          where the run directory goes, checkpoints and resume
[faults]       injected client failures and delays (reliability drills and tests)
[privacy]      differential privacy: client-level DP on the server (florist.privacy)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

from florist.aggregation import (
    ByteBudget,
    EnergyThreshold,
    FixedRank,
    RankPolicy,
    available,
    make_aggregator,
    wire_bytes,
)
from florist.aggregation.base import Aggregator, aggregator_class
from florist.aggregation.florist import FEEDBACK_RANKS
from florist.aggregation.lowrank import WARM_FROM, WARM_SPLITS
from florist.aggregation.protocols import protocol_of
from florist.aggregation.rank_policy import NoiseThreshold
from florist.aggregation.robust import CLIP_MODES
from florist.config.training import LORA_INITS, TrainSettings, check_batching
from florist.dtypes import COMPUTE, MODEL, WIRE, torch_dtype
from florist.errors import ConfigError
from florist.precision import check_precision

if TYPE_CHECKING:
    from florist.aggregation.held import HeldUpdates
    from florist.privacy.accountant import Accountant

UPLINK_CUTS = ("adapter", "change")  # what uplink thresholding cuts (florist.client.local)


@dataclass(frozen=True)
class Misfit:
    """A key a config sets that its aggregation method does not take: why not, and the override
    (``section.key=value``) that turns it off."""

    key: str
    why: str
    fix: str


def refusal(method: str, misfits: Sequence[Misfit]) -> ConfigError:
    """One error naming every key ``method`` does not take and every override that fixes them, so a
    config written for one method (``florist demo``'s) is switched to another in one step."""
    listed = "; ".join(f"{m.key} ({m.why})" for m in misfits)
    fixes = " ".join(dict.fromkeys(m.fix for m in misfits))
    return ConfigError(f"aggregation.method = {method!r} does not take {listed}. To run it, add: {fixes}")


def _positive(key: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{key} must be a positive finite number, got {value}")


def _at_least_one(key: str, value: int) -> None:
    if value < 1:
        raise ConfigError(f"{key} must be >= 1, got {value}")


QUANTIZATIONS = ("none", "nf4", "int8")


@dataclass(frozen=True)
class ModelConfig:
    name: str = field(default="smollm2", metadata={"help": "'smollm2' (embedded), a hub id or a local dir"})
    dtype: str = field(default="float32", metadata={"help": "weight dtype: float32, bfloat16 or float16"})
    device: str = field(default="auto", metadata={"help": "auto (cuda when present), cpu or cuda"})
    quantization: str = field(
        default="none",
        metadata={
            "help": "the clients' frozen base: 'none', 'nf4' or 'int8' (bitsandbytes); merge methods hold "
            "the global updates beside it as a frozen adapter"
        },
    )
    global_adapter_max_rank: int | None = field(
        default=None,
        metadata={
            "help": "quantized base, merge methods: re-compress the held global adapter to at most this "
            "rank per module after each round (None: exact, its rank grows every round)"
        },
    )
    global_adapter_tau: float = field(
        default=1.0,
        metadata={
            "help": "quantized base, merge methods: keep the smallest rank of the held global adapter "
            "holding this energy fraction after each round (1.0: all)"
        },
    )

    def __post_init__(self) -> None:
        torch_dtype(self.dtype, "model.dtype", MODEL)
        if self.quantization not in QUANTIZATIONS:
            raise ConfigError(
                f"model.quantization must be one of {list(QUANTIZATIONS)}, got {self.quantization!r}"
            )
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"model.device must be auto, cpu or cuda, got {self.device!r}")
        if self.global_adapter_max_rank is not None and self.global_adapter_max_rank < 1:
            raise ConfigError(
                f"model.global_adapter_max_rank must be >= 1, got {self.global_adapter_max_rank}"
            )
        if not 0 < self.global_adapter_tau <= 1:
            raise ConfigError(f"model.global_adapter_tau must be in (0, 1], got {self.global_adapter_tau}")
        capped = self.global_adapter_max_rank is not None or self.global_adapter_tau < 1
        if capped and self.quantization == "none":
            raise ConfigError(
                "model.global_adapter_max_rank and model.global_adapter_tau cap the global adapter that "
                "clients hold beside a quantized base; with model.quantization = 'none' they merge into it"
            )

    def torch_dtype(self) -> torch.dtype:
        return torch_dtype(self.dtype, "model.dtype", MODEL)

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


TEMPLATES = ("alpaca", "chat")
FORMATS = ("dolly", "alpaca", "wizard", "chat")  # data.format: the row layouts florist.data.records reads


@dataclass(frozen=True)
class DataConfig:
    source: str = field(default="skills", metadata={"help": "'skills' (embedded), a file, folder or hub id"})
    format: str | None = field(
        default=None, metadata={"help": "dolly, alpaca, wizard or chat (messages); detected if unset"}
    )
    template: str = field(
        default="alpaca",
        metadata={
            "help": "prompt template: 'alpaca' or 'chat' (the model's chat template; recorded in the adapter)"
        },
    )
    split: str = field(
        default="dirichlet",
        metadata={
            "help": "presplit (one file per client), iid, dirichlet, by_label (one client per label value)"
        },
    )
    alpha: float = field(default=0.5, metadata={"help": "Dirichlet concentration"})
    label: str = field(
        default="category", metadata={"help": "the column the Dirichlet and by_label splits group rows by"}
    )
    min_partition_size: int = field(
        default=1, metadata={"help": "Dirichlet split: fewest examples a client may get (redrawn until met)"}
    )
    test: str | None = field(default=None, metadata={"help": "held-out file; else a fraction of source"})
    test_fraction: float = field(
        default=0.05, metadata={"help": "held-out share of source when data.test is unset"}
    )
    exclude: tuple[str, ...] = field(default=("test.json",), metadata={"help": "files a folder source skips"})
    max_examples_per_client: int | None = field(
        default=None, metadata={"help": "cap on each client's training rows (unset: all of its share)"}
    )
    validation_per_label: int = field(
        default=0,
        metadata={"help": "withhold this many training rows per category as a validation split (0: none)"},
    )
    skills_train: int = field(default=60, metadata={"help": "skills set: train examples per skill"})
    skills_test: int = field(default=20, metadata={"help": "skills set: test examples per skill"})
    seed: int = field(
        default=0, metadata={"help": "seed of the split, the held-out draw and the evaluation subset"}
    )

    def __post_init__(self) -> None:
        if self.template not in TEMPLATES:
            raise ConfigError(f"data.template must be one of {list(TEMPLATES)}, got {self.template!r}")
        if self.format is not None and self.format not in FORMATS:
            raise ConfigError(f"data.format must be one of {list(FORMATS)} or unset, got {self.format!r}")
        if self.split not in ("presplit", "iid", "dirichlet", "by_label"):
            raise ConfigError(f"data.split must be presplit, iid, dirichlet or by_label, got {self.split!r}")
        if not 0 < self.test_fraction < 1:
            raise ConfigError(f"data.test_fraction must be in (0, 1), got {self.test_fraction}")
        _positive("data.alpha", self.alpha)
        for key in ("min_partition_size", "skills_train", "skills_test"):
            _at_least_one(f"data.{key}", getattr(self, key))
        if self.validation_per_label < 0:
            raise ConfigError(f"data.validation_per_label must be >= 0, got {self.validation_per_label}")
        if self.max_examples_per_client is not None and self.max_examples_per_client < 1:
            raise ConfigError(
                f"data.max_examples_per_client must be >= 1, got {self.max_examples_per_client}"
            )


@dataclass(frozen=True)
class AdapterConfig:
    """[lora]: each client's LoRA adapter (named so that it does not shadow ``peft.LoraConfig``).

    One client's adapter is the same type with its one rank and its alpha resolved (``settings``):
    what ``florist.client.local.LocalClient`` trains, validated here once.
    """

    ranks: tuple[int, ...] = field(default=(16,), metadata={"help": "one rank per client, or one for all"})
    alpha: float | None = field(default=None, metadata={"help": "LoRA alpha; unset: alpha_ratio * rank"})
    alpha_ratio: float = field(
        default=2.0, metadata={"help": "alpha = alpha_ratio * rank when lora.alpha is unset"}
    )
    dropout: float = field(default=0.05, metadata={"help": "LoRA dropout on the adapted modules' input"})
    target_modules: tuple[str, ...] = field(
        default=("q_proj", "v_proj"), metadata={"help": "linear modules to adapt, by name or name suffix"}
    )
    use_rslora: bool = field(
        default=False, metadata={"help": "rank-stabilised scaling alpha / sqrt(rank) instead of alpha / rank"}
    )
    init: str = field(
        default="shared",
        metadata={"help": "fresh LoRA A each round: 'shared' (one draw per round) or 'per_client'"},
    )
    warm_start: bool = field(
        default=False,
        metadata={"help": "florist/flora: continue from the leading r_k directions of the global update"},
    )
    warm_split: str = field(
        default="orthonormal",
        metadata={"help": "warm start: 'orthonormal' (B = U S, A = V^T) or 'balanced' (sqrt(S) on B and A)"},
    )
    warm_from: str = field(
        default="last",
        metadata={"help": "warm start splits the 'last' global update or the 'accumulated' sum of all"},
    )

    def __post_init__(self) -> None:
        if not self.ranks or any(r < 1 for r in self.ranks):
            raise ConfigError(f"lora.ranks must be positive integers, got {list(self.ranks)}")
        if self.init not in LORA_INITS:
            raise ConfigError(f"lora.init must be one of {list(LORA_INITS)}, got {self.init!r}")
        if self.warm_split not in WARM_SPLITS:
            raise ConfigError(f"lora.warm_split must be one of {list(WARM_SPLITS)}, got {self.warm_split!r}")
        if self.warm_from not in WARM_FROM:
            raise ConfigError(f"lora.warm_from must be one of {list(WARM_FROM)}, got {self.warm_from!r}")
        if self.warm_from != "last" and not self.warm_start:
            raise ConfigError(
                f"lora.warm_from = {self.warm_from!r} needs lora.warm_start = true; without warm start set "
                "lora.warm_from = 'last'"
            )
        if self.alpha is not None:
            _positive("lora.alpha", self.alpha)
        _positive("lora.alpha_ratio", self.alpha_ratio)
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ConfigError("lora.target_modules is empty")

    def rank_of(self, client: int, num_clients: int) -> int:
        if len(self.ranks) not in (1, num_clients):
            raise ConfigError(
                f"lora.ranks has {len(self.ranks)} entries; give one, or one per client ({num_clients})"
            )
        return self.ranks[0] if len(self.ranks) == 1 else self.ranks[client]

    def client_ranks(self, num_clients: int) -> list[int]:
        """Every client's rank, in client order."""
        return [self.rank_of(k, num_clients) for k in range(num_clients)]

    def shared_rank(self, num_clients: int) -> int:
        """Rows of a draw every client trains against (FedIT's shared ``A``, FFA-LoRA's frozen one):
        the largest client rank; each client keeps its leading rows."""
        return max(self.client_ranks(num_clients))

    def settings(self, client: int, num_clients: int) -> AdapterConfig:
        """Client ``client``'s adapter: its one rank, its alpha resolved."""
        r = self.rank_of(client, num_clients)
        return replace(self, ranks=(r,), alpha=self.alpha if self.alpha is not None else self.alpha_ratio * r)

    @property
    def rank(self) -> int:
        """The rank of one client's adapter (``settings``)."""
        if len(self.ranks) != 1:
            raise ConfigError(f"lora.ranks holds {len(self.ranks)} ranks; one client's adapter has one")
        return self.ranks[0]

    def peft_config(self) -> Any:
        """One client's adapter as a ``peft.LoraConfig``."""
        from peft import LoraConfig

        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha if self.alpha is not None else self.alpha_ratio * self.rank,  # type: ignore[arg-type]  # peft annotates int, accepts float
            lora_dropout=self.dropout,
            target_modules=list(self.target_modules),
            use_rslora=self.use_rslora,
            task_type="CAUSAL_LM",
        )


@dataclass(frozen=True)
class FederationConfig:
    num_clients: int = field(
        default=4, metadata={"help": "clients (deployment: SuperNodes with partition-id 0..N-1)"}
    )
    rounds: int = field(default=3, metadata={"help": "federated rounds"})
    fraction: float = field(default=1.0, metadata={"help": "fraction of clients sampled per round"})
    min_clients: int = field(default=1, metadata={"help": "fewest clients a round may sample"})
    participation: tuple[tuple[int, ...], ...] | None = field(
        default=None, metadata={"help": "explicit client indices per round, e.g. [[0, 1], [1, 2]]"}
    )
    seed: int = field(
        default=0, metadata={"help": "seed of client sampling, LoRA initialisation and local training"}
    )
    timeout: float = field(default=3600.0, metadata={"help": "seconds to wait for a round's replies"})
    round_timeout: float | None = field(
        default=None, metadata={"help": "seconds to wait for training replies; later ones are left out"}
    )
    min_replies: int = field(
        default=1,
        metadata={
            "help": "fewest usable updates a round needs; with fewer it is skipped (under client-level "
            "DP a round releases the noise alone instead)"
        },
    )
    max_skipped_rounds: int = field(
        default=3, metadata={"help": "consecutive skipped rounds after which the run stops (non-zero exit)"}
    )
    max_message_mb: float = field(
        default=2000.0, metadata={"help": "largest message (MB, 1e6 bytes) sent or accepted; gRPC: 2 GiB"}
    )
    wire_dtype: str = field(
        default="float32", metadata={"help": "dtype of the factors in messages: float32, bfloat16, float16"}
    )
    uplink_tau: float | None = field(
        default=None, metadata={"help": "clients send the tau-energy truncated SVD of their update"}
    )
    max_client_weight: float | None = field(
        default=None,
        metadata={
            "help": "largest aggregation weight n_k / sum(n) of one client (water-filled); unset: none"
        },
    )
    uplink_cut: str = field(
        default="adapter",
        metadata={
            "help": "with warm start and uplink_tau: cut the round's 'change' (s B'A' - B_w A_w) or the "
            "whole 'adapter' (warm part included)"
        },
    )
    cpus_per_client: float = field(default=2.0, metadata={"help": "simulation: CPU cores per client, whole"})
    gpus_per_client: float | str = field(
        default="auto",
        metadata={"help": "simulation: GPU fraction per client; 'auto': the visible GPUs shared by the "
                  "clients that run at once (0 without CUDA)"},
    )  # fmt: skip

    def __post_init__(self) -> None:
        if self.num_clients < 1 or self.rounds < 1:
            raise ConfigError(f"need >= 1 client and round, got {self.num_clients} and {self.rounds}")
        if not 1 <= self.min_replies <= self.num_clients:
            raise ConfigError(
                f"federation.min_replies must be in [1, {self.num_clients}], got {self.min_replies}"
            )
        if self.max_skipped_rounds < 1:
            raise ConfigError(f"federation.max_skipped_rounds must be >= 1, got {self.max_skipped_rounds}")
        for key in ("timeout", "round_timeout", "max_message_mb"):
            value = getattr(self, key)
            if value is not None and not value > 0:
                raise ConfigError(f"federation.{key} must be > 0, got {value}")
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"federation.fraction must be in (0, 1], got {self.fraction}")
        _positive("federation.cpus_per_client", self.cpus_per_client)
        if not float(self.cpus_per_client).is_integer():  # Flower's simulation config takes whole cores
            raise ConfigError(
                f"federation.cpus_per_client must be a whole number of cores, got {self.cpus_per_client}"
            )
        g = self.gpus_per_client
        if (isinstance(g, str) and g != "auto") or (
            isinstance(g, float) and not (math.isfinite(g) and g >= 0)
        ):
            raise ConfigError(f"federation.gpus_per_client must be 'auto' or a number >= 0, got {g!r}")
        if self.wire_dtype not in WIRE:
            raise ConfigError(f"federation.wire_dtype must be one of {list(WIRE)}, got {self.wire_dtype!r}")
        if self.max_client_weight is not None and not 0 < self.max_client_weight <= 1:
            raise ConfigError(f"federation.max_client_weight must be in (0, 1], got {self.max_client_weight}")
        if self.uplink_cut not in UPLINK_CUTS:
            raise ConfigError(
                f"federation.uplink_cut must be one of {list(UPLINK_CUTS)}, got {self.uplink_cut!r}"
            )
        if self.uplink_tau is not None and not 0 < self.uplink_tau <= 1:
            raise ConfigError(f"federation.uplink_tau must be in (0, 1], got {self.uplink_tau}")
        if not 1 <= self.min_clients <= self.num_clients:
            raise ConfigError(
                f"federation.min_clients must be in [1, {self.num_clients}], got {self.min_clients}"
            )
        if self.participation is not None:
            self._check_participation(self.participation)

    def _check_participation(self, schedule: tuple[tuple[int, ...], ...]) -> None:
        if len(schedule) != self.rounds:
            raise ConfigError(
                f"federation.participation lists {len(schedule)} rounds; rounds = {self.rounds}"
            )
        for t, ids in enumerate(schedule, 1):
            bad = [i for i in ids if not 0 <= i < self.num_clients]
            if not ids or bad or len(set(ids)) != len(ids):
                raise ConfigError(
                    f"federation.participation round {t}: {list(ids)} must be distinct client "
                    f"indices in [0, {self.num_clients})"
                )


@dataclass(frozen=True)
class AggregationConfig:
    method: str = field(
        default="florist",
        metadata={
            "help": "aggregator: florist, flora, fedit, flexlora, ffa, rblora, fedex, fedsvd, fedsb, full"
        },
    )
    tau: float | None = field(default=None, metadata={"help": "florist: energy threshold (default 0.9)"})
    rank: int | None = field(default=None, metadata={"help": "florist: fixed global rank"})
    budget_mb: float | None = field(default=None, metadata={"help": "florist: download budget per round"})
    min_rank: int = field(default=1, metadata={"help": "florist: fewest directions kept per module"})
    max_rank: int | None = field(
        default=None, metadata={"help": "florist: most directions kept per module (unset: no cap)"}
    )
    dtype: str = field(default="float32", metadata={"help": "aggregation compute dtype: float32 or float64"})
    basis: str = field(
        default="qr", metadata={"help": "florist: how the stacks are factored, 'qr' (fast) or 'svd'"}
    )
    clip: str = field(
        default="none", metadata={"help": "robust mode: 'none', 'median' or 'fixed' norm clipping per client"}
    )
    clip_value: float = field(
        default=1.0, metadata={"help": "'median': threshold = value x median client norm; 'fixed': the norm"}
    )
    rank_policy: str = field(
        default="auto",
        metadata={
            "help": "florist: 'auto' (tau, rank or budget_mb as given) or 'noise' (with privacy.mode = "
            "'client': the singular values above the optimal hard threshold of the DP noise)"
        },
    )
    error_feedback: bool = field(
        default=False,
        metadata={
            "help": "florist: keep what the rank cut leaves out of a round's aggregate on the server and "
            "add it to the next round's before the SVD (never sent)"
        },
    )
    feedback_rank: str = field(
        default="total",
        metadata={
            "help": "florist with error_feedback: rank the carried aggregate ('total': tau of its energy) "
            "or this round's aggregate alone ('fresh': as many directions as without the carry)"
        },
    )
    init_samples: int = field(
        default=170,
        metadata={"help": "fedsb: rows (over all clients, by size) whose summed gradient sets the basis"},
    )
    init_lr: float | None = field(
        default=None,
        metadata={
            "help": "fedsb: size of the sign step the basis approximates "
            "(unset: train.lr / max(1, 0.02 x rounds x steps per round), the reference's warmup rate)"
        },
    )

    def __post_init__(self) -> None:
        if self.method not in available():
            raise ConfigError(f"aggregation.method must be one of {available()}, got {self.method!r}")
        if self.clip not in CLIP_MODES:
            raise ConfigError(f"aggregation.clip must be one of {list(CLIP_MODES)}, got {self.clip!r}")
        if not self.clip_value > 0:
            raise ConfigError(f"aggregation.clip_value must be > 0, got {self.clip_value}")
        if (
            isinstance(self.init_samples, bool)
            or not isinstance(self.init_samples, int)
            or self.init_samples < 1
        ):
            raise ConfigError(f"aggregation.init_samples must be an integer >= 1, got {self.init_samples!r}")
        if self.rank_policy not in RANK_POLICIES:
            raise ConfigError(
                f"aggregation.rank_policy must be one of {list(RANK_POLICIES)}, got {self.rank_policy!r}"
            )
        if self.init_lr is not None and not (math.isfinite(self.init_lr) and self.init_lr > 0):
            raise ConfigError(f"aggregation.init_lr must be > 0, got {self.init_lr!r}")
        if self.feedback_rank not in FEEDBACK_RANKS:
            raise ConfigError(
                f"aggregation.feedback_rank must be one of {list(FEEDBACK_RANKS)}, got {self.feedback_rank!r}"
            )
        if self.feedback_rank != "total" and not self.error_feedback:
            raise ConfigError(
                f"aggregation.feedback_rank = {self.feedback_rank!r} ranks error feedback's carried "
                "aggregate; set aggregation.error_feedback = true"
            )
        if not self.misfits():  # a whole config refuses every misfit at once (FloristConfig.misfits)
            self.aggregator_options()  # validates tau/rank/budget_mb

    def misfits(self) -> list[Misfit]:
        """The keys of this section that its method does not take: florist's rank cut and carry."""
        if aggregator_class(self.method).rank_policy:
            return []
        keys = [k for k in ("tau", "rank", "budget_mb") if getattr(self, k) is not None]
        out = [Misfit(f"aggregation.{k}", "florist's rank cut", f"aggregation.{k}=none") for k in keys]
        if self.error_feedback:
            why = "florist's carry of what its rank cut leaves out"
            out.append(Misfit("aggregation.error_feedback", why, "aggregation.error_feedback=false"))
            if self.feedback_rank != "total":
                why = "it goes with aggregation.error_feedback"
                out.append(Misfit("aggregation.feedback_rank", why, "aggregation.feedback_rank='total'"))
        if self.rank_policy == "noise":
            out.append(
                Misfit("aggregation.rank_policy", "florist's noise rule", "aggregation.rank_policy='auto'")
            )
        return out

    def policy(self) -> RankPolicy:
        """FLoRIST's rank policy: a fixed rank, a byte budget per client, or the energy threshold tau."""
        chosen = [x is not None for x in (self.tau, self.rank, self.budget_mb)]
        if sum(chosen) > 1:
            raise ConfigError("give at most one of tau, rank and budget_mb (--tau, --rank, --budget-mb)")
        if self.rank is not None:
            return FixedRank(self.rank)
        if self.budget_mb is not None:
            if not (math.isfinite(self.budget_mb) and self.budget_mb > 0):
                raise ConfigError(
                    f"budget_mb (--budget-mb, aggregation.budget_mb) must be > 0, got {self.budget_mb!r}"
                )
            budget = int(self.budget_mb * 1_000_000)
            return ByteBudget(budget, min_rank=self.min_rank, max_rank=self.max_rank)
        if self.rank_policy == "noise":
            if sum(chosen):
                raise ConfigError("aggregation.rank_policy = 'noise' takes no tau, rank or budget_mb")
            return NoiseThreshold(self.min_rank, self.max_rank)
        return EnergyThreshold(0.9 if self.tau is None else self.tau, self.min_rank, self.max_rank)

    def aggregator_options(self, wire_dtype: str = "float32") -> dict[str, Any]:
        """The method's keyword options; a byte budget is priced at ``wire_dtype``'s element size."""
        opts: dict[str, Any] = {"dtype": torch_dtype(self.dtype, "--dtype (aggregation.dtype)", COMPUTE)}
        if aggregator_class(self.method).rank_policy:
            opts |= {"policy": self.policy(), "basis": self.basis, "wire_bytes": wire_bytes(wire_dtype)}
            if self.error_feedback:
                if self.rank_policy == "noise":
                    raise ConfigError(
                        "aggregation.error_feedback would carry the DP noise the noise rule cut into the "
                        "next round"
                    )
                opts |= {"feedback": True, "feedback_rank": self.feedback_rank}
        elif misfits := self.misfits():
            raise refusal(self.method, misfits)
        return opts

    def build(self, wire_dtype: str = "float32") -> Aggregator:
        """The aggregator this section describes, sending in ``wire_dtype`` (a run's:
        ``FloristConfig.aggregator``): the one place an aggregator is made from options."""
        return make_aggregator(self.method, **self.aggregator_options(wire_dtype))


RANK_POLICIES = ("auto", "noise")
PRIVACY_MODES = ("none", "client", "dp-sgd")
# products of the clients' changes (florist, flora), or one factor against a shared A (ffa, fedsvd)
CLIENT_DP_METHODS = ("florist", "flora", "ffa", "fedsvd", "fedit", "fedsb")


@dataclass(frozen=True)
class PrivacyConfig:
    """Differential privacy (``florist.privacy``): ``mode = "client"`` is client-level DP on a trusted
    server, each client's round change clipped to ``clip`` and Gaussian noise of std
    ``noise_multiplier x clip`` on their sum; ``mode = "dp-sgd"`` is sample-level DP on every client,
    each example's gradient clipped to ``max_grad_norm`` and noise of std ``noise_multiplier x
    max_grad_norm`` on the batch's sum. Give the noise multiplier or a ``target_epsilon`` it is
    calibrated to, at ``delta``."""

    mode: str = field(
        default="none",
        metadata={"help": "'none', 'client' (client-level DP, trusted server) or 'dp-sgd' (on every client)"},
    )
    clip: float = field(
        default=1.0, metadata={"help": "client: Frobenius bound C on each client's round change, all modules"}
    )
    max_grad_norm: float = field(
        default=1.0, metadata={"help": "dp-sgd: bound on each example's gradient (all LoRA parameters)"}
    )
    noise_multiplier: float | None = field(
        default=None, metadata={"help": "noise std / the bound (unset: calibrated to target_epsilon)"}
    )
    target_epsilon: float | None = field(
        default=None,
        metadata={"help": "client: epsilon the whole run may spend (a run beyond it is refused)"},
    )
    delta: float = field(default=1e-5, metadata={"help": "client: delta of the (epsilon, delta) guarantee"})
    noise_seed: int | None = field(
        default=None,
        metadata={"help": "reproducible noise for studies and tests: NOT private (unset: OS randomness)"},
    )

    def __post_init__(self) -> None:
        if self.mode not in PRIVACY_MODES:
            raise ConfigError(f"privacy.mode must be one of {list(PRIVACY_MODES)}, got {self.mode!r}")
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ConfigError(f"privacy.clip must be > 0, got {self.clip!r}")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ConfigError(f"privacy.max_grad_norm must be > 0, got {self.max_grad_norm!r}")
        if self.noise_multiplier is not None and not (
            math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0
        ):
            raise ConfigError(f"privacy.noise_multiplier must be >= 0, got {self.noise_multiplier!r}")
        if self.target_epsilon is not None and not (self.target_epsilon > 0):
            raise ConfigError(f"privacy.target_epsilon must be > 0, got {self.target_epsilon!r}")
        if not 0 < self.delta < 1:
            raise ConfigError(f"privacy.delta must be in (0, 1), got {self.delta!r}")


@dataclass(frozen=True)
class EvalConfig:
    every: int = field(default=1, metadata={"help": "evaluate the global model every N rounds (0: never)"})
    before: bool = field(default=True, metadata={"help": "also evaluate the base model before round 1"})
    exact_match: bool = field(default=True, metadata={"help": "exact match on the held-out set"})
    heldout_loss: bool = field(
        default=True, metadata={"help": "mean token loss and perplexity of the held-out set"}
    )
    subset: int | None = field(default=None, metadata={"help": "held-out examples to score (all if unset)"})
    mmlu: str | None = field(default=None, metadata={"help": "path to an MMLU json (mmlu_1444.json format)"})
    mmlu_subset: int | None = field(default=200, metadata={"help": "MMLU questions scored (all if unset)"})
    batch_size: int = field(default=16, metadata={"help": "evaluation batch size"})
    max_new_tokens: int = field(default=12, metadata={"help": "exact match: tokens generated per answer"})
    max_length: int = field(
        default=256, metadata={"help": "held-out loss: tokens per example (longer ones truncated)"}
    )
    precision: str = field(
        default="auto",
        metadata={"help": "auto (bf16 autocast where native), fp32 or bf16"},
    )
    batching: str = field(
        default="padded",
        metadata={
            "help": "held-out loss batches: 'padded' (length-sorted: little padding, as fast) or 'packed'"
        },
    )

    def __post_init__(self) -> None:
        check_precision("eval.precision", self.precision)
        check_batching("eval.batching", self.batching)
        if self.every < 0:
            raise ConfigError(f"eval.every must be >= 0, got {self.every}")
        for key in ("batch_size", "max_new_tokens", "max_length", "subset", "mmlu_subset"):
            if getattr(self, key) is not None:
                _at_least_one(f"eval.{key}", getattr(self, key))


@dataclass(frozen=True)
class OutputConfig:
    """[run]: where the run directory goes, what it keeps, and resume."""

    dir: str = field(default="runs", metadata={"help": "parent folder of run directories"})
    name: str | None = field(default=None, metadata={"help": "run directory name; default method-time"})
    save_client_updates: bool = field(default=False, metadata={"help": "write every client's upload"})
    tensorboard: bool = field(
        default=False, metadata={"help": "also write RUN/tensorboard/ (needs tensorboard)"}
    )
    progress: bool = field(default=True, metadata={"help": "progress bars on the console"})
    checkpoint_keep: int = field(default=2, metadata={"help": "server checkpoints kept (latest N rounds)"})
    resume: bool = field(default=False, metadata={"help": "continue the run in run.dir/run.name"})
    force: bool = field(default=False, metadata={"help": "resume even if the config changed"})

    def __post_init__(self) -> None:
        if self.checkpoint_keep < 1:
            raise ConfigError(f"run.checkpoint_keep must be >= 1, got {self.checkpoint_keep}")
        if self.resume and not self.name:
            raise ConfigError("run.resume needs run.name: the run directory to continue")


@dataclass(frozen=True)
class FaultsConfig:
    """Injected failures, seeded: for reliability drills and tests. All off by default."""

    drop_fraction: float = field(
        default=0.0, metadata={"help": "fraction of all clients that fail each round (seeded)"}
    )
    slow_clients: tuple[int, ...] = field(default=(), metadata={"help": "client indices that stall"})
    slow_rounds: tuple[int, ...] = field(default=(), metadata={"help": "rounds they stall in (empty: all)"})
    slow_seconds: float = field(default=0.0, metadata={"help": "how long a slow client stalls"})
    seed: int = field(default=0, metadata={"help": "seed of the injected failures"})

    def __post_init__(self) -> None:
        if not 0 <= self.drop_fraction < 1:
            raise ConfigError(f"faults.drop_fraction must be in [0, 1), got {self.drop_fraction}")
        if self.slow_seconds < 0:
            raise ConfigError(f"faults.slow_seconds must be >= 0, got {self.slow_seconds}")


@dataclass(frozen=True)
class FloristConfig:
    """A whole florist run, one field per TOML section (not Flower's ``run_config``, a flat key map
    that ``florist.config.loader.from_flower_run_config`` turns into this)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: AdapterConfig = field(default_factory=AdapterConfig)
    train: TrainSettings = field(default_factory=TrainSettings)
    federation: FederationConfig = field(default_factory=FederationConfig)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: OutputConfig = field(default_factory=OutputConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)

    def __post_init__(self) -> None:
        n = self.federation.num_clients
        self.lora.rank_of(0, n)  # ranks list length matches the number of clients
        self._check_protocol_options()
        self._check_privacy()
        if self.data.split == "presplit" and self.data.source == "skills":
            raise ConfigError("data.split = 'presplit' needs a folder source with one file per client")

    def _check_protocol_options(self) -> None:
        """Refuse, in one error, every key the method does not take (``misfits``)."""
        if misfits := self.misfits():
            raise refusal(self.aggregation.method, misfits)

    def misfits(self) -> list[Misfit]:
        """The keys this config sets that its aggregation method does not take: warm start and clipping
        need a client that restarts from the merged model, uplink thresholding a server that multiplies
        the factors, a global adapter cap a client that merges, Fed-SB a full-precision base and one
        rank; florist's own keys florist (``AggregationConfig.misfits``)."""
        method = self.aggregation.method
        cls = aggregator_class(method)
        rules = protocol_of(cls.protocol)
        out = self.aggregation.misfits()
        if self.lora.warm_start and not rules.fits_warm_start:
            why = f"needs a merge-and-restart method, florist or flora: {method!r} clients continue already"
            out.append(Misfit("lora.warm_start", why, "lora.warm_start=false"))
            if self.lora.warm_from != "last":
                out.append(Misfit("lora.warm_from", "it goes with lora.warm_start", "lora.warm_from='last'"))
        if self.aggregation.clip != "none" and not rules.fits_clip:
            why = "its clients' upload holds what they continued from, not just their change"
            out.append(Misfit("aggregation.clip", why, "aggregation.clip='none'"))
        if self.model.quantization != "none" and rules.needs_init:
            why = "it starts from the gradient of the base weights, which a quantized base does not have"
            out.append(Misfit("model.quantization", why, "model.quantization='none'"))
        if not rules.merges:
            why = "its clients never merge into their base, so they hold no global adapter to cap"
            if self.model.global_adapter_max_rank is not None:
                out.append(Misfit("model.global_adapter_max_rank", why, "model.global_adapter_max_rank=none"))
            if self.model.global_adapter_tau < 1:
                out.append(Misfit("model.global_adapter_tau", why, "model.global_adapter_tau=1.0"))
        ranks = self.lora.client_ranks(self.federation.num_clients)
        if rules.needs_init and len(set(ranks)) > 1:
            why = "it trains one r x r core shared by every client: give every client one rank"
            out.append(Misfit("unequal lora.ranks", why, f"lora.ranks=[{max(ranks)}]"))
        if self.federation.uplink_tau is not None and not cls.products_only:
            why = "needs a server that multiplies B_k A_k (florist, flora, flexlora); it uses the factors"
            out.append(Misfit("federation.uplink_tau", why, "federation.uplink_tau=none"))
        return out

    def _check_privacy(self) -> None:
        p, method = self.privacy, self.aggregation.method
        if self.aggregation.rank_policy == "noise" and p.mode != "client":
            raise ConfigError(
                "aggregation.rank_policy = 'noise' needs privacy.mode = 'client' (a known noise level)"
            )
        if p.mode == "dp-sgd":
            if self.train.gradient_checkpointing:
                raise ConfigError(
                    "privacy.mode = 'dp-sgd' cannot use train.gradient_checkpointing: recomputing a layer "
                    "runs Opacus's per-example hooks twice"
                )
            if p.noise_multiplier is None and p.target_epsilon is None:
                raise ConfigError(
                    "privacy.mode = 'dp-sgd' needs privacy.noise_multiplier or privacy.target_epsilon"
                )
            if protocol_of(aggregator_class(method).protocol).needs_init:
                raise ConfigError(
                    f"privacy.mode = 'dp-sgd' does not cover {method!r}: its round 0 sends each client's raw "
                    "gradient sum"
                )
            return
        if p.mode != "client":
            return
        if method not in CLIENT_DP_METHODS:
            raise ConfigError(
                f"privacy.mode = 'client' is implemented for {list(CLIENT_DP_METHODS)} (their server "
                f"needs only the sum of the clients' changes), not yet for {method!r}"
            )
        n = self.federation.num_clients
        if method in ("ffa", "fedsvd", "fedit") and len(set(self.lora.client_ranks(n))) > 1:
            raise ConfigError(f"privacy.mode = 'client' with {method!r} needs one rank for every client")
        if self.aggregation.clip != "none":
            raise ConfigError(
                "privacy.mode = 'client' clips every change to privacy.clip: set aggregation.clip = 'none'"
            )
        if p.noise_multiplier is None and p.target_epsilon is None:
            raise ConfigError(
                "privacy.mode = 'client' needs privacy.noise_multiplier or privacy.target_epsilon"
            )
        if (replies := self.federation.min_replies) > 1:
            raise ConfigError(
                f"privacy.mode = 'client' needs federation.min_replies = 1, got {replies}: "
                "a round skipped for too few replies would depend on which clients are in the data"
            )
        if (
            protocol_of(aggregator_class(method).protocol).needs_init
            and self.aggregation.init_lr is None
            and self.train.steps is None
            and self.train.examples is None
        ):
            raise ConfigError(
                f"privacy.mode = 'client' with {method!r}: its round-0 step size may not depend on the "
                "clients' sizes; set aggregation.init_lr, train.steps or train.examples"
            )
        if p.delta >= 1 / self.federation.num_clients:
            raise ConfigError(
                f"privacy.delta = {p.delta:g} is not below 1 / num_clients = "
                f"{1 / self.federation.num_clients:g}"
            )
        acc = self.accountant()
        assert acc is not None
        spent = acc.epsilon(self.federation.rounds)
        if p.target_epsilon is not None and spent > p.target_epsilon * (1 + 1e-9):
            raise ConfigError(
                f"privacy: {self.federation.rounds} rounds at noise multiplier {acc.sigma:g}, sample rate "
                f"{acc.q:.3g} spend epsilon {spent:.3g} at delta {p.delta:g}, beyond privacy.target_epsilon "
                f"= {p.target_epsilon:g}"
            )

    def accountant(self) -> Accountant | None:
        """Client-level DP's accountant: the noise multiplier (given, or the smallest reaching
        ``target_epsilon`` over the run's rounds) and the sample rate (``fraction``, the Poisson rate;
        1 under a schedule), with Fed-SB's round 0 (every client's clipped gradient, noised) as one more
        release at rate 1; None without client-level DP."""
        p, fed = self.privacy, self.federation
        if p.mode != "client":  # dp-sgd: each client's own (florist.privacy.sample_level.plan)
            return None
        from florist.privacy.accountant import Accountant, noise_for

        # a schedule is public and fixed: no amplification, every round composed at rate 1 (an upper
        # bound: a client is in at most every round); else the Poisson rate of Server.participants
        q = 1.0 if fed.participation is not None else fed.fraction
        first = 1 if protocol_of(aggregator_class(self.aggregation.method).protocol).needs_init else 0
        sigma = p.noise_multiplier
        if sigma is None:
            assert p.target_epsilon is not None
            try:
                sigma = noise_for(p.target_epsilon, p.delta, q, fed.rounds, first)
            except ValueError as err:
                raise ConfigError(f"privacy.target_epsilon = {p.target_epsilon:g}: {err}") from None
        return Accountant(sigma, q, p.delta, first)

    def dp_denominator(self, round: int) -> float:
        """What client-level DP divides the noised sum by: public, never the count that replied (one
        client's presence changes it): the round's scheduled clients, else the expected size of the
        Poisson sample, ``fraction x num_clients`` (every client when ``fraction`` = 1)."""
        fed = self.federation
        if fed.participation is not None:
            return float(len(set(fed.participation[round - 1])))
        return fed.fraction * fed.num_clients

    def aggregator(self) -> Aggregator:
        """The run's aggregator: ``[aggregation]`` with a byte budget priced at the run's wire dtype."""
        return self.aggregation.build(self.federation.wire_dtype)

    def held_updates(self) -> HeldUpdates | None:
        """Where merge-protocol clients keep the global updates: None (merged into the base weights),
        or on a quantized base an empty held adapter under ``model.global_adapter_*``'s cap. The one
        place this is decided; the server's model holds the same (``florist.aggregation.held``)."""
        if self.model.quantization == "none" or not protocol_of(self.aggregator().protocol).merges:
            return None
        from florist.aggregation.held import HeldUpdates

        return HeldUpdates(self.model.global_adapter_max_rank, self.model.global_adapter_tau)

    def round_zero(self, sizes: Sequence[int]) -> tuple[list[int], float]:
        """Fed-SB's round 0, the one place it is decided: the rows each client (of ``sizes`` rows) sums
        its gradient over and the sign-step size. By size; under client-level DP from public numbers
        only (equal shares, the step size from ``init_lr`` or the configured steps), since one client's
        size would otherwise move every other client's share and so the sum beyond the clip."""
        from florist.aggregation.fedsb import init_shares

        if self.privacy.mode == "client":
            return init_shares(self.aggregation.init_samples, [1] * len(sizes)), self.init_lr(0)
        return init_shares(self.aggregation.init_samples, sizes), self.init_lr(max(sizes))

    def init_lr(self, num_examples: int) -> float:
        """Fed-SB's sign-step size: ``aggregation.init_lr``, else the reference's ``lr / (0.02 x total
        steps)`` with the run's local steps (a client of ``num_examples`` rows, every round)."""
        if self.aggregation.init_lr is not None:
            return self.aggregation.init_lr
        from florist.aggregation.fedsb import default_init_lr

        return default_init_lr(self.train.lr, self.federation.rounds * self.train.num_steps(num_examples))

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)
