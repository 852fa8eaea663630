"""The methods a comparison runs: each baseline once, FLoRIST at several tau, and the byte budget.

A variant is a name plus ``aggregation.*`` overrides for the run config; everything else (data,
seeds, local budget) is shared, so the methods differ only in how the server aggregates.
"""

from __future__ import annotations

from dataclasses import dataclass

BASELINES = ("fedit", "flora", "flexlora", "ffa")
DEFAULT_TAUS = (1.0, 0.95, 0.9, 0.87, 0.8)
LABELS = {"fedit": "FedIT", "flora": "FLoRA", "flexlora": "FlexLoRA", "ffa": "FFA-LoRA"}


@dataclass(frozen=True)
class Variant:
    name: str  # "FLoRIST tau=0.90"
    method: str  # registry name
    tau: float | None = None
    budget_mb: float | None = None

    def overrides(self) -> list[str]:
        out = [f"aggregation.method={self.method!r}"]
        if self.tau is not None:
            out.append(f"aggregation.tau={self.tau}")
        if self.budget_mb is not None:
            out.append(f"aggregation.budget_mb={self.budget_mb}")
        return out


def florist(tau: float) -> Variant:
    return Variant(f"FLoRIST tau={tau:.2f}", "florist", tau=tau)


def budget(mb: float, matched: str) -> Variant:
    return Variant(f"FLoRIST budget={mb:.3f} MB (= {matched})", "florist", budget_mb=mb)


def sweep(baselines: tuple[str, ...] = BASELINES, taus: tuple[float, ...] = DEFAULT_TAUS) -> list[Variant]:
    return [Variant(LABELS[m], m) for m in baselines] + [florist(t) for t in taus]
