"""FedSVD (Lee et al., NeurIPS 2025, arXiv 2505.12805): clients train only B against the server's A;
the server averages B and re-factorises the product by SVD into a new orthonormal A.

    A shared and frozen on every client: the seeded draw in round 1, then the server's last A
    B_avg = sum_k p_k pad(s_k B_k)                               (m, r_max)
    B_avg A = Q R A = Q (U_c S V^T) = (Q U_c S) V^T             (QR of B_avg; SVD of the r x n core)
    A_new = V^T  (r_max, n), orthonormal rows;  B_new = Q U_c S  (m, r_max), the singular values
    B_new @ A_new == B_avg @ A == sum_k p_k s_k B_k A_k          (exact, because A is shared)

Clients load A_new and B_new, keep A frozen and continue training B from B_new; they upload only B
(the server knows the A they trained against) and download B and A.

Where florist follows the reference code (``seanie12/fed-svd``, ``misc/utils.py::reinit_lora`` and
``fedmm/fedavg/server.py``): B averaged with weights n_k / sum n; the product's top right singular
vectors become A and all the singular values go into B (no square-root split); re-factorised every
round (the code's default period 1, no warm-up rounds); round 1 trains against a random (seeded,
not orthonormal) A; a fresh optimiser every round; the base weights are never merged.

Where it differs, and why:
- The SVD is of the factored product (a QR of B_avg, then the SVD of the small r x n core) instead
  of the dense m x n ``B @ A``: the same singular triplets, never an m x n matrix.
- With heterogeneous ranks (the reference has one rank), A has r_max rows and a client of rank r_k
  trains against its leading r_k rows and downloads the leading r_k components of the new factors:
  the best rank-r_k approximation of the aggregate (with one rank, the exact aggregate).
- The sign of each singular pair is fixed (the largest entry of each row of A positive), so the
  factors the clients receive do not depend on the LAPACK build.
- The reference averages B as ``B + sum_k p_k (B_k - B)``, the same when every client of the round
  replies; florist averages the B's that arrived, as every continue method here does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from florist.aggregation.base import (
    AggregationResult,
    Aggregator,
    ClientProtocol,
    module_names,
    per_client_slices,
    register,
)
from florist.aggregation.ffa import averaged_b
from florist.lora.update import ClientUpdate, LoraFactors


def refactorise(B: Tensor, A: Tensor) -> LoraFactors:
    """``B @ A`` (m x r, r x n) as ``B' @ A'`` with orthonormal rows in ``A'`` and the singular
    values in ``B'``, of the same rank r so every round has the same shapes: zero singular values are
    kept, and where r exceeds min(m, n) the rows beyond it are zero (nothing to train against)."""
    r = A.shape[0]
    Q, R = torch.linalg.qr(B)  # (m, k), (k, r), k = min(m, r)
    U, S, Vh = torch.linalg.svd(R @ A, full_matrices=False)  # (k, p), (p,), (p, n), p = min(k, n)
    signs = torch.sign(Vh.gather(1, Vh.abs().argmax(dim=1, keepdim=True))).squeeze(1)
    signs[signs == 0] = 1.0
    A_new, B_new = Vh * signs[:, None], (Q @ U) * (S * signs)
    p = A_new.shape[0]
    if p < r:
        A_new = torch.cat([A_new, A_new.new_zeros(r - p, A_new.shape[1])])
        B_new = torch.cat([B_new, B_new.new_zeros(B_new.shape[0], r - p)], dim=1)
    return LoraFactors(A=A_new, B=B_new)


@register("fedsvd")
@dataclass(frozen=True)
class FedSVD(Aggregator):
    """FedSVD aggregation: average B against the shared A, re-factorise ``B_avg A`` by SVD.

    Parameters
    ----------
    dtype : torch.dtype
        Compute dtype, float32 or float64.
    """

    dtype: torch.dtype = torch.float32

    protocol = ClientProtocol.TRAIN_B_ON_SERVER_A
    exact = True
    products_only = False  # every client's B must be taken against the one A the server chose
    label = "FedSVD"

    def _aggregate(self, updates: Sequence[ClientUpdate], weights: Tensor) -> AggregationResult:
        global_update = {}
        for name in module_names(updates):
            avg = averaged_b(updates, name, weights, self.dtype, self.label)  # B_avg against the round's A
            global_update[name] = refactorise(avg.B, avg.A)
        return AggregationResult(
            method=self.name,
            protocol=self.protocol,
            global_update=global_update,
            per_client=per_client_slices(updates, global_update),
            energy_kept={name: 1.0 for name in global_update},
        )
