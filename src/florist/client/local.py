"""One federated client: its model stays loaded across rounds and follows its aggregator's protocol.

MERGE_AND_RESTART   (florist, flora)  W0 += B_g A_g, then a fresh LoRA of the client's own rank
CONTINUE_GLOBAL     (fedit)           load its rank's slice of the global A, B; keep training
CONTINUE_PER_CLIENT (flexlora)        load its own truncation; keep training
FROZEN_SHARED_A     (ffa)             A frozen and shared (seeded), load the global B
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

from florist.aggregation.base import ClientProtocol
from florist.client.lora_state import assign, extract, merge_into_base, reinit
from florist.client.train import LoraSettings, TrainSettings, TrainStats, encode_all, train
from florist.data.records import Example
from florist.lora import ClientUpdate, LoraFactors


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (client id, round, ...), stable across processes."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


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
    lora, training : LoraSettings, TrainSettings
        Its adapter and local budget.
    protocol : ClientProtocol
        What to do with downloads (from the aggregator).
    seed : int
        Run seed; the FFA-LoRA shared A depends on it only, so it must be the same on every client.
    shared_a_rank : int | None
        FFA-LoRA: rank of the shared A draw (the largest client rank).
    """

    def __init__(
        self,
        client_id: str,
        base_model: Any,
        tokenizer: Any,
        examples: Sequence[Example],
        lora: LoraSettings,
        training: TrainSettings,
        protocol: ClientProtocol,
        seed: int,
        shared_a_rank: int | None = None,
    ) -> None:
        from peft import get_peft_model

        self.client_id, self.protocol, self.seed = client_id, protocol, seed
        self.training, self.num_examples = training, len(examples)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.encoded = encode_all(examples, tokenizer, training)
        self.model = get_peft_model(base_model, lora.peft_config())
        self.frozen_a_rank = (
            (shared_a_rank or lora.rank) if protocol is ClientProtocol.FROZEN_SHARED_A else None
        )
        self._fresh_lora(round=0)

    def _fresh_lora(self, round: int) -> None:
        seed = self.seed if self.frozen_a_rank is not None else derive_seed(self.seed, self.client_id, round)
        reinit(self.model, seed, frozen_a_rank=self.frozen_a_rank)

    def receive(self, download: Mapping[str, LoraFactors], round: int) -> None:
        """Apply what the server sent after ``round`` (before training round ``round + 1``)."""
        if self.protocol is ClientProtocol.MERGE_AND_RESTART:
            merge_into_base(self.model, download)
            self._fresh_lora(round)
        else:
            assign(self.model, download, b_only=self.protocol is ClientProtocol.FROZEN_SHARED_A)

    def fit(self, round: int) -> tuple[ClientUpdate, TrainStats]:
        """Train locally for one round and return the update to upload."""
        seed = derive_seed(self.seed, self.client_id, round, "train")
        stats = train(
            self.model,
            self.encoded,
            self.training,
            seed=seed,
            pad_id=self.pad_id,
            desc=f"{self.client_id} round {round}",
        )
        update = ClientUpdate(self.client_id, float(self.num_examples), extract(self.model))
        return update, stats
