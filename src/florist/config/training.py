"""How much a client trains per round: the local budget (the config's ``[train]`` section, used by
``florist.client``; the adapter it trains is ``[lora]``, ``florist.config.schema.AdapterConfig``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from florist.errors import ConfigError
from florist.precision import check_precision

LORA_INITS = ("shared", "per_client")  # see florist.client.local
BATCHINGS = ("padded", "packed")  # see florist.data.tokenize


def check_batching(key: str, value: str) -> None:
    """Raise ``ConfigError`` naming ``key`` unless ``value`` is one of ``BATCHINGS``."""
    if value not in BATCHINGS:
        raise ConfigError(f"{key} must be one of {list(BATCHINGS)}, got {value!r}")


@dataclass(frozen=True)
class TrainSettings:
    """One client's local training budget per round, in the paper's terms.

    The effective batch is ``batch_size x grad_accum`` examples per optimizer step; the budget per
    round is exactly one of ``steps`` (optimizer steps), ``epochs`` (passes over the client's data,
    fractions allowed) or ``examples`` (examples seen). The paper's code: batch 16 x accumulation 8,
    1 epoch per round; "effective batch 32, 1/8 epoch per round" is ``batch_size = 4, grad_accum = 8,
    epochs = 0.125``. Data is drawn from one shuffled stream per client that continues across rounds
    (``BatchStream``), so an epoch split over rounds sees every row once.

    ``batching`` lays a batch out "packed" (its rows side by side, no padding computed) or "padded";
    both give the same loss and gradients up to float rounding (``florist.data.tokenize``).
    ``compile`` runs the decoder layers under ``torch.compile`` (``florist.client.compiled``).
    """

    lr: float = field(default=3e-4, metadata={"help": "AdamW learning rate"})
    steps: int | None = field(
        default=10,
        metadata={"help": "local budget per round in optimizer steps (give one of steps, epochs, examples)"},
    )
    epochs: float | None = field(
        default=None,
        metadata={"help": "local budget per round in passes over the client's data (fractions allowed)"},
    )
    examples: int | None = field(default=None, metadata={"help": "local budget per round in examples seen"})
    batch_size: int = field(default=4, metadata={"help": "examples per forward pass"})
    grad_accum: int = field(
        default=1,
        metadata={"help": "forward passes per optimizer step (effective batch: batch_size x grad_accum)"},
    )
    max_length: int = field(
        default=256, metadata={"help": "tokens per training example (longer ones truncated)"}
    )
    train_on_inputs: bool = field(
        default=False, metadata={"help": "also train on the prompt tokens, not only the response"}
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float | None = field(
        default=1.0, metadata={"help": "gradient norm clipping (unset: none)"}
    )
    precision: str = field(
        default="auto",
        metadata={"help": "auto (bf16 autocast where the CPU/GPU has it natively), fp32 or bf16"},
    )
    batching: str = field(
        default="packed", metadata={"help": "'packed' (rows side by side, no padding computed) or 'padded'"}
    )
    compile: bool = field(
        default=False, metadata={"help": "decoder layers under torch.compile (a slow first round)"}
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata={
            "help": "recompute the decoder layers' activations in the backward pass: less memory, more time"
        },
    )

    def __post_init__(self) -> None:
        check_precision("train.precision", self.precision)
        check_batching("train.batching", self.batching)
        given = {k: v for k in ("steps", "epochs", "examples") if (v := getattr(self, k)) is not None}
        if len(given) != 1:
            raise ConfigError(
                "give exactly one of train.steps, train.epochs and train.examples, got "
                f"steps={self.steps}, epochs={self.epochs}, examples={self.examples}"
            )
        for name in ("batch_size", "grad_accum", "max_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name, value in given.items():
            if not value > 0:
                raise ConfigError(f"train.{name} must be positive, got {value}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")

    @property
    def effective_batch(self) -> int:
        return self.batch_size * self.grad_accum

    def num_steps(self, num_examples: int) -> int:
        """Optimizer steps this round for a client with ``num_examples`` rows."""
        if self.steps is not None:
            return self.steps
        wanted = self.examples if self.examples is not None else float(self.epochs or 0) * num_examples
        return max(1, math.ceil(wanted / self.effective_batch))

    def examples_per_round(self, num_examples: int) -> int:
        """Examples drawn per round (steps x effective batch)."""
        return self.num_steps(num_examples) * self.effective_batch
