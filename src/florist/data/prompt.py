"""The prompt templates: the Alpaca-style one (``data.template = "alpaca"``, below) and the model's own
chat template (``"chat"``: the conversation as ``tokenizer.apply_chat_template`` writes it, with the
generation prompt, so an adapter served behind a chat endpoint sees the prompts it trained on).

A chat example's earlier turns (``Example.history``) go in the Alpaca prompt's input, one
"role: content" line each, before any context.

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

from typing import Any

from florist.data.records import Example
from florist.errors import ConfigError

HEADER = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
HEADER_CTX = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)


def prompt(ex: Example) -> str:
    """Everything before the response in the Alpaca template (what the model is conditioned on)."""
    context = "\n".join(
        [*(f"{role}: {text}" for role, text in ex.history), *([ex.context] if ex.context.strip() else [])]
    )
    if context.strip():
        body = f"### Instruction:\n{ex.instruction}\n\n### Input:\n{context}\n\n### Response:\n"
        return f"{HEADER_CTX}\n\n{body}"
    return f"{HEADER}\n\n### Instruction:\n{ex.instruction}\n\n### Response:\n"


def messages(ex: Example) -> list[dict[str, str]]:
    """The conversation up to the response: earlier turns, then the instruction (and any context) as
    the user's turn."""
    user = f"{ex.instruction}\n\n{ex.context}" if ex.context.strip() else ex.instruction
    return [*({"role": r, "content": c} for r, c in ex.history), {"role": "user", "content": user}]


def chat_prompt(ex: Example, tokenizer: Any) -> str:
    """The prompt as the model's chat template writes it, ending with the assistant's generation cue."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            "data.template = 'chat' needs a tokenizer with a chat template; this model's has none "
            "(use data.template = 'alpaca')"
        )
    text = tokenizer.apply_chat_template(messages(ex), tokenize=False, add_generation_prompt=True)
    return str(text)
