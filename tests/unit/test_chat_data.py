"""Chat data (``messages``) and the model's chat template (``data.template = "chat"``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from florist.config import load_config
from florist.data.prompt import chat_prompt, prompt
from florist.data.records import Example, detect_format, to_example
from florist.data.tokenize import IGNORE, encode
from florist.errors import ConfigError
from tests.tiny_tokenizer import tiny_tokenizer

TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
ROW = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "2+2?"},
                    {"role": "assistant", "content": "4"}], "category": "math"}  # fmt: skip


def chat_tokenizer():  # type: ignore[no-untyped-def]
    tok = tiny_tokenizer()
    tok.chat_template = TEMPLATE
    return tok


def test_a_messages_row_is_the_last_exchange_with_its_history() -> None:
    assert detect_format(ROW) == "chat"
    ex = to_example(ROW, "chat")
    assert (ex.instruction, ex.response, ex.category) == ("2+2?", "4", "math")
    assert ex.history == (("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello"))
    text = prompt(ex)  # the Alpaca template puts the conversation so far in its input
    assert (
        "### Input:\nsystem: Be brief.\nuser: Hi\nassistant: Hello" in text
        and "### Instruction:\n2+2?" in text
    )


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([{"role": "user", "content": "x"}], "must end with a user turn"),
        (
            [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}],
            "must end with a user turn",
        ),
        ([{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}], "must be a list of"),
        ("hello", "must be a list of"),
    ],
)
def test_bad_conversations_are_named(messages: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        to_example({"messages": messages}, "chat", "train.jsonl line 3")


def test_the_chat_template_writes_the_prompt_and_the_loss_is_on_the_answer_only() -> None:
    tok = chat_tokenizer()
    ex = Example("2+2?", "4", template="chat", history=(("system", "Be brief."),))
    text = chat_prompt(ex, tok)
    assert text == "<system>Be brief.\n<user>2+2?\n<assistant>"
    enc = encode(ex, tok, 256)
    n = len(tok(text, add_special_tokens=False)["input_ids"])
    assert (
        enc.input_ids[:n] == tok(text, add_special_tokens=False)["input_ids"]
    )  # no bos added: the template's
    assert enc.labels[:n] == [IGNORE] * n and enc.labels[n:] == enc.input_ids[n:]
    assert enc.input_ids[-1] == tok.eos_token_id and tok.decode(enc.input_ids[n:-1]) == "4"
    with pytest.raises(ConfigError, match="needs a tokenizer with a chat template"):
        encode(ex, tiny_tokenizer(), 256)


def test_the_template_key_is_checked_and_applied_to_every_row(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data.template must be one of"):
        load_config(None, ["data.template='chatml'"])
    from florist.data.federated import client_examples, test_examples

    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(ROW | {"category": f"c{i % 2}"}) for i in range(20)) + "\n")
    cfg = load_config(None, [f"data.source={str(path)!r}", "data.template='chat'", "federation.num_clients=2",
                             "data.split='iid'"])  # fmt: skip
    rows = client_examples(cfg.data, 0, 2) + test_examples(cfg.data)
    assert rows and all(ex.template == "chat" for ex in rows)
