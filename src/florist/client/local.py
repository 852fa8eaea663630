"""One federated client: its model stays loaded across rounds and follows its aggregator's protocol.

MERGE_AND_RESTART   (florist, flora)  W0 += B_g A_g, then a fresh LoRA of the client's own rank
CONTINUE_GLOBAL     (fedit)           load its rank's slice of the global A, B; keep training
CONTINUE_PER_CLIENT (flexlora)        load its own truncation; keep training
FROZEN_SHARED_A     (ffa)             A frozen and shared (seeded), load the global B
MERGE_AND_CONTINUE  (fedex)           W0 += B_g A_g, then move the leading r_k columns of the global
                                      factors (its slice of the averages) back into its LoRA

Fresh LoRA (``A`` seeded, ``B = 0``), by ``lora.init``:
    shared       every client of a round draws A from one seed (run seed, round): a client of rank r_k
                 takes the leading r_k rows of the largest rank's draw
    per_client   each client draws its own A from (run seed, client id, round), as the paper's code does
Continue-protocol clients start round 1 from the shared draw whatever ``lora.init`` says: in FedAvg
every client of a round starts from the same global adapter, the seeded initial one in round 1.

Protocol options (each off by default):
    warm start (``lora.warm_start``)   before training, a merge-protocol client moves the leading r_k
        directions of the last global update it merged (``lora.warm_from = "last"``), or of the sum
        of all it merged (``"accumulated"``), out of its base weights and into its LoRA
        (``florist.aggregation.lowrank.leading_split``): the model is unchanged, its LoRA does not
        start at B = 0. The server removes that warm part from the upload again (``without_warm_part``).
        ``lora.warm_split`` says how the singular values are shared between B and A.
        Done at the start of ``fit``, so a node that only syncs keeps the server's weights bitwise.
    uplink thresholding (``uplink_tau``) the upload is the tau-truncated SVD of ``s B A``; with warm
        start and ``uplink_cut = "change"``, of the round's change ``s B' A' - B_w A_w`` instead
        (rank r_k + p from its factors side by side), which the server takes as it is
    wire dtype (``wire``)              the upload as the server will decode it (bf16 / fp16 rounded)
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from florist.aggregation.base import ClientProtocol
from florist.aggregation.held import HeldUpdates
from florist.aggregation.lowrank import prepare_upload, warm_source, without_warm_part
from florist.aggregation.protocols import ClientRules, protocol_of
from florist.client.lora_state import assign, assign_leading, extract, lora_layers, reinit
from florist.client.merged import BesideBase, InBase
from florist.client.train import TrainSettings, TrainStats, encode_all, gradient_sum, train
from florist.config import FloristConfig
from florist.config.schema import AdapterConfig, PrivacyConfig
from florist.data.records import Example
from florist.lora import ClientUpdate, LoraFactors
from florist.privacy.sample_level import SamplePlan, plan
from florist.seeds import derive_seed


class LocalClient:
    """A client's LoRA model, data and protocol; ``base_model`` is wrapped (and mutated) in place.

    Parameters
    ----------
    client_id : str
        Unique id.
    base_model, tokenizer
        A transformers causal LM and its tokenizer.
    examples : Sequence[Example]
        The client's training data.
    lora, training : AdapterConfig, TrainSettings
        Its adapter (one rank: ``AdapterConfig.settings``) and local budget.
    protocol : ClientProtocol
        What to do with downloads (from the aggregator).
    seed : int
        Run seed; every shared draw depends on it, so it must be the same on every client.
    shared_a_rank : int | None
        Rank of the shared A draw (the largest client rank); the client's own rank if None.
    uplink_tau : float | None
        Send the ``uplink_tau``-energy truncated SVD of the update instead of the factors.
    wire : str
        Dtype of the upload on the wire: "float32", "bfloat16" or "float16".
    uplink_cut : str
        With warm start and ``uplink_tau``: truncate the round's "change" or the whole "adapter".
    progress : bool
        A step bar while it trains, where one can be drawn (``run.progress``).
    privacy : PrivacyConfig | None
        With ``mode = "dp-sgd"``, every step is DP-SGD's (``florist.privacy.sample_level``), planned
        over ``rounds`` rounds: its noise multiplier given or calibrated to the target epsilon.
    rounds : int
        The run's rounds (DP-SGD's accounting).
    held : HeldUpdates | None
        On a quantized base (merge protocols): the global updates are held beside the frozen base
        as this adapter (``florist.client.merged.BesideBase``) instead of merged into it.
    """

    def __init__(
        self,
        client_id: str,
        base_model: Any,
        tokenizer: Any,
        examples: Sequence[Example],
        lora: AdapterConfig,
        training: TrainSettings,
        protocol: ClientProtocol,
        seed: int,
        shared_a_rank: int | None = None,
        uplink_tau: float | None = None,
        wire: str = "float32",
        uplink_cut: str = "adapter",
        progress: bool = True,
        privacy: PrivacyConfig | None = None,
        rounds: int = 1,
        held: HeldUpdates | None = None,
    ) -> None:
        from peft import get_peft_model

        self.client_id, self.protocol, self.seed = client_id, protocol, seed
        self.rules: ClientRules = protocol_of(protocol)
        self.lora, self.training = lora, training
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.encoded = encode_all(examples, tokenizer, training)
        self.num_examples = len(self.encoded)  # n_k: the examples it trains on
        with warnings.catch_warnings():  # peft reads transformers' deprecated is_gradient_checkpointing
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            self.model = get_peft_model(base_model, lora.peft_config())
        self.base = InBase(self.model) if held is None else BesideBase(self.model, held)  # merges go here
        self.shared_rank = shared_a_rank or lora.rank
        self.uplink_tau, self.wire, self.uplink_cut = uplink_tau, wire, uplink_cut
        self.progress = progress  # a step bar while it trains (run.progress)
        self.warm: Mapping[str, LoraFactors] | None = None  # the warm part this round began from
        self.raw_upload: dict[str, LoraFactors] = {}  # what the upload was cut from (round errors)
        self.pending_warm: Mapping[str, LoraFactors] | None = None
        self.unsplit: Any = None  # the merged state before a warm split (``self.base.snapshot()``)
        self.merged: list[Mapping[str, LoraFactors]] = []  # global updates merged (warm_from accumulated)
        self.upload_energy: dict[str, float] = {}
        self.dp: SamplePlan | None = None
        self.dp_seed = privacy.noise_seed if privacy is not None else None
        if privacy is not None and privacy.mode == "dp-sgd":
            steps = rounds * training.num_steps(self.num_examples)
            p = privacy
            self.dp = plan(self.num_examples, training.effective_batch, steps, p.max_grad_norm, p.delta,
                           p.noise_multiplier, p.target_epsilon)  # fmt: skip
        self._fresh_lora(round=0)

    @property
    def init(self) -> str:
        """The init policy in force: continue protocols always start from the shared draw (FedAvg)."""
        return self.rules.init_policy(self.lora.init)

    def _fresh_lora(self, round: int) -> None:
        self.rules.fresh(self, round, self.lora.init)

    def receive(self, download: Mapping[str, LoraFactors], round: int) -> None:
        """Apply what the server sent after ``round`` (before training round ``round + 1``)."""
        self.rules.receive(self, download, round, self.lora.init)

    # ---------------------------------------------------- what a protocol does with this client

    def fresh_lora(self, round: int, policy: str, freeze_a: bool = False) -> None:
        """``A`` seeded, ``B = 0``: one draw per round for every client ("shared"), the client's own
        ("per_client"), or one frozen draw for the whole run ("frozen", FFA-LoRA)."""
        if policy == "frozen":
            reinit(self.model, self.seed, draw_rank=self.shared_rank, freeze_a=True)
        elif policy == "shared":
            reinit(self.model, derive_seed(self.seed, "shared-init", round), draw_rank=self.shared_rank)
        else:
            reinit(self.model, derive_seed(self.seed, self.client_id, round))

    def merge(self, update: Mapping[str, LoraFactors]) -> None:
        """``W0 += B A`` (or into the held adapter), after undoing last round's warm split exactly."""
        if self.unsplit is not None:
            self.base.restore(self.unsplit)
            self.unsplit = None
        self.base.fold(update)

    def load(self, factors: Mapping[str, LoraFactors], b_only: bool = False) -> None:
        assign(self.model, factors, b_only=b_only)

    def hold_warm(self, download: Mapping[str, LoraFactors], always: bool = False) -> None:
        """Warm-start the next ``fit`` from ``download`` (``always``), else as ``lora.warm_start`` says:
        from the last merged global or from all of them (``lora.warm_from``)."""
        if always:
            self.pending_warm = download
        elif self.lora.warm_start:
            self.merged = [*self.merged, download] if self.lora.warm_from == "accumulated" else [download]
            self.pending_warm = warm_source(self.merged, self.lora.warm_from)

    def fit(
        self, round: int, on_step: Callable[[TrainStats], None] | None = None
    ) -> tuple[ClientUpdate, TrainStats]:
        """Train locally for one round and return the update to upload (``on_step``: see ``train``)."""
        self.warm = None
        if self.pending_warm is not None:
            self._warm_start(self.pending_warm)
            self.pending_warm = None
        seed = derive_seed(self.seed, self.client_id, round, "train")
        per_round = self.training.examples_per_round(len(self.encoded))
        stats = train(
            self.model,
            self.encoded,
            self.training,
            seed=seed,
            pad_id=self.pad_id,
            desc=f"{self.client_id} round {round}",
            data_seed=derive_seed(self.seed, self.client_id, "data"),
            start=max(0, round - 1) * per_round,
            on_step=on_step,
            progress=self.progress,
            dp=self.dp,
            dp_seed=None if self.dp_seed is None else derive_seed(self.dp_seed, self.client_id, round),
        )
        if self.dp is not None:
            stats.epsilon = self.dp.epsilon(round * self.training.num_steps(self.num_examples))
        return ClientUpdate(self.client_id, float(self.num_examples), self._upload()), stats

    def init_gradient(self, rows: int) -> dict[str, torch.Tensor]:
        """Round 0 of a protocol that needs one (Fed-SB): the summed gradient of every adapted base
        weight over the first ``rows`` rows of this client's data stream (``gradient_sum``)."""
        return gradient_sum(
            self.model, self.encoded, self.training, dict(lora_layers(self.model)),
            rows=min(rows, len(self.encoded)), pad_id=self.pad_id,
            data_seed=derive_seed(self.seed, self.client_id, "init"),
        )  # fmt: skip

    def _warm_start(self, download: Mapping[str, LoraFactors]) -> None:
        """Move the leading r_k directions of ``download`` from the base weights into the LoRA.

        The merged weights are kept aside and put back before the next merge, so the base follows
        the server's global model bitwise whatever the split rounded.
        """
        self.unsplit = self.base.snapshot()
        warm = self.rules.warm_part(download, self.lora.rank, self.lora.warm_split)
        self.base.add({n: LoraFactors(A=w.A, B=-w.B) for n, w in warm.items()})
        assign_leading(self.model, warm)
        self.warm = warm

    def _upload(self) -> dict[str, LoraFactors]:
        """The LoRA (or, with ``uplink_cut = "change"``, the round's change) as the server will decode
        it: truncated (``uplink_tau``) and wire-rounded."""
        lora = extract(self.model)
        if self.sends_change:
            assert self.warm is not None
            lora = dict(without_warm_part(ClientUpdate(self.client_id, 1.0, lora), self.warm).modules)
        self.raw_upload = lora
        modules, self.upload_energy = prepare_upload(lora, self.uplink_tau, self.wire)
        return modules

    @property
    def sends_change(self) -> bool:
        """Whether this round's upload is the change: warm-started, cut, ``uplink_cut = "change"``
        (the server's ``florist.aggregation.protocols.sends_change`` says the same from the config)."""
        return (
            self.warm is not None
            and self.lora.warm_start
            and self.uplink_tau is not None
            and self.uplink_cut == "change"
        )


def client_id(index: int) -> str:
    """The id of client ``index`` (0-based): the one name a node, the bench and the run directory use."""
    return f"client-{index:03d}"


def client_from_config(
    cfg: FloristConfig,
    index: int,
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    protocol: ClientProtocol,
    *,
    as_trained: bool = False,
) -> LocalClient:
    """Client ``index`` of the federation ``cfg`` describes: its LoRA and budget, the shared draw's
    rank (the largest client rank), the run seed and the upload options (``as_trained``: uploads as
    trained, not cut nor rounded, as round-1 studies keep them). The one place a client is built."""
    n, fed = cfg.federation.num_clients, cfg.federation
    return LocalClient(
        client_id(index), model, tokenizer, examples, cfg.lora.settings(index, n), cfg.train, protocol,
        fed.seed, cfg.lora.shared_rank(n), uplink_tau=None if as_trained else fed.uplink_tau,
        wire="float32" if as_trained else fed.wire_dtype, uplink_cut=fed.uplink_cut,
        progress=cfg.run.progress, privacy=cfg.privacy, rounds=fed.rounds, held=cfg.held_updates(),
    )  # fmt: skip
