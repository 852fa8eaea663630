"""The Alpaca-style prompt template, and which tokens the loss is computed on.

Below is an instruction that describes a task[, paired with an input that provides further
context]. Write a response that appropriately completes the request.

### Instruction:
{instruction}

[### Input:
{context}

]### Response:
{response}<eos>
"""

from __future__ import annotations

from florist.data.records import Example

HEADER = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
HEADER_CTX = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)


def prompt(ex: Example) -> str:
    """Everything before the response (what the model is conditioned on)."""
    if ex.context.strip():
        body = f"### Instruction:\n{ex.instruction}\n\n### Input:\n{ex.context}\n\n### Response:\n"
        return f"{HEADER_CTX}\n\n{body}"
    return f"{HEADER}\n\n### Instruction:\n{ex.instruction}\n\n### Response:\n"
