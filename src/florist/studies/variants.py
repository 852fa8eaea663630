"""The methods a comparison runs: the baselines, FLoRIST at several tau, and FLoRIST's protocol options.

A variant is a name plus config overrides (``aggregation.*``, and for the options ``lora.warm_start``,
``lora.warm_split``, ``lora.warm_from``, ``federation.uplink_tau``, ``federation.wire_dtype``);
everything else (data, seeds, local budget, init policy) is shared, so the variants differ only in
what the protocol does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from florist.aggregation.base import aggregator_class
from florist.errors import ConfigError
from florist.studies import full

BASELINES = ("fedit", "flora", "flexlora", "ffa", "rblora", "fedex", "fedsvd")
# runnable by name (--extra-baselines) but not in the default sweep: Fed-SB needs one rank for every
# client, which the heterogeneous setting does not have
KNOWN = (*BASELINES, "fedsb")
DEFAULT_TAUS = (0.95, 0.9, 0.8)
OPTIONS = {  # name -> overrides; "all" combines the first three, "a+b" any of them
    "warm": (("lora.warm_start", True), ("lora.warm_split", "balanced")),  # the first split measured
    "uplink": (("federation.uplink_tau", None),),  # None: the variant's own tau
    "bf16": (("federation.wire_dtype", "bfloat16"),),
    "orth": (("lora.warm_start", True), ("lora.warm_split", "orthonormal")),  # warm, A = V^T
    "acc": (("lora.warm_start", True), ("lora.warm_from", "accumulated")),  # warm from sum_t B_t A_t
    "chg": (("federation.uplink_cut", "change"),),  # uplink cuts the round's change, not the adapter
    "ef": (("aggregation.error_feedback", True),),  # the server carries the cut's tail to the next round
    # ... at the rank this round's aggregate alone needs: the carry takes no more directions
    "efr": (("aggregation.error_feedback", True), ("aggregation.feedback_rank", "fresh")),
}
UPLINK_TAU = 0.9  # tau_up of a baseline's "uplink" option (FLoRIST's is its own tau)
ALL = ("warm", "uplink", "bf16")


@dataclass(frozen=True)
class Variant:
    name: str  # "FLoRIST tau=0.90 +warm"
    method: str  # registry name
    tau: float | None = None
    budget_mb: float | None = None
    options: tuple[tuple[str, Any], ...] = field(default=())

    def overrides(self) -> dict[str, Any]:
        """Config keys this variant sets, ``section.key`` -> value."""
        out: dict[str, Any] = {"aggregation.method": self.method, "aggregation.tau": self.tau,
                               "aggregation.budget_mb": self.budget_mb, "aggregation.rank": None}  # fmt: skip
        return out | dict(self.options)


def florist(tau: float, options: Sequence[str] = ()) -> Variant:
    """FLoRIST at ``tau`` with protocol ``options`` (names of ``OPTIONS``, "all", or "a+b" combos).

    >>> florist(0.9, ["all+orth"]).name
    'FLoRIST tau=0.90 +all +orth'
    """
    tokens = check_options(options)
    names = [*(ALL if "all" in tokens else ()), *(t for t in tokens if t != "all")]
    pairs = dict((k, tau if k == "federation.uplink_tau" else v) for n in names for k, v in OPTIONS[n])
    label = "".join(f" +{t}" for t in dict.fromkeys(tokens))
    return Variant(f"FLoRIST tau={tau:.2f}{label}", "florist", tau=tau, options=tuple(pairs.items()))


def check_options(options: Sequence[str]) -> list[str]:
    """The option names in ``options`` ("a+b" split), or a ``ConfigError`` naming the unknown ones."""
    tokens = [t for o in options for t in o.split("+")]
    unknown = sorted(set(tokens) - set(OPTIONS) - {"all"})
    if unknown:
        raise ConfigError(f"unknown FLoRIST option(s) {unknown}; known: {[*OPTIONS, 'all']}")
    return tokens


def budget(mb: float, matched: str) -> Variant:
    return Variant(f"FLoRIST budget={mb:.3f} MB (= {matched})", "florist", budget_mb=mb)


def baseline(method: str, options: Sequence[str] = (), uplink_tau: float = UPLINK_TAU) -> Variant:
    """A baseline with protocol ``options`` (names of ``OPTIONS``, or ``rN``: every client's LoRA rank
    N, e.g. Fed-SB's r): "FLoRA +bf16 +orth", "Fed-SB +bf16 +r64"."""
    ranks = [t for o in options for t in o.split("+") if t[:1] == "r" and t[1:].isdigit() and int(t[1:]) > 0]
    tokens = check_options([t for o in options for t in o.split("+") if t not in ranks])
    names = [*(ALL if "all" in tokens else ()), *(t for t in tokens if t != "all")]
    pairs: dict[str, Any] = {
        k: uplink_tau if k == "federation.uplink_tau" else v for n in names for k, v in OPTIONS[n]
    }
    if ranks:
        pairs["lora.ranks"] = (int(ranks[-1][1:]),)
    tokens += ranks[-1:]
    label = aggregator_class(method).label
    return Variant(
        label + "".join(f" +{n}" for n in dict.fromkeys(tokens)), method, options=tuple(pairs.items())
    )


def parse_baseline(spec: str) -> Variant:
    """``"flora+bf16+orth"`` -> ``baseline("flora", ["bf16", "orth"])``; a ``ConfigError`` names a bad one."""
    method, *options = spec.split("+")
    if method not in KNOWN:
        raise ConfigError(f"unknown baseline {method!r} in {spec!r}; known: {list(KNOWN)}")
    return baseline(method, options)


def full_finetune() -> Variant:
    """FedAvg on the full weights of the adapted modules (``florist.studies.full``), not an aggregator."""
    return Variant(full.LABEL, full.METHOD)


def sweep(
    baselines: Sequence[str] = BASELINES,
    taus: Sequence[float] = DEFAULT_TAUS,
    option_taus: Sequence[float] = (),
    options: Sequence[str] = ("warm", "uplink", "bf16", "all"),
) -> list[Variant]:
    """Each baseline, full fine-tuning, FLoRIST at each tau, and at each of ``option_taus`` every
    option alone and all."""
    out = [baseline(m) for m in baselines] + [full_finetune()] + [florist(t) for t in taus]
    return out + [florist(t, [o]) for t in option_taus for o in options]
