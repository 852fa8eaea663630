"""One instruction example, whatever data set it came from, and the field mappings that make it.

Dolly:   instruction, context, response, category
Alpaca:  instruction, input, output
WizardLM evol-instruct: instruction, output  (or ShareGPT-style "conversations")
Chat:    messages: [{"role": "system" | "user" | "assistant", "content": ...}, ...], the last turn the
         assistant's (the response), the one before it the user's (the instruction), any earlier
         ones the conversation so far (``Example.history``)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from florist.config.schema import FORMATS
from florist.errors import ConfigError

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Example:
    instruction: str
    response: str
    context: str = ""
    category: str = ""
    history: tuple[tuple[str, str], ...] = ()  # (role, content) turns before the instruction (chat)
    template: str = "alpaca"  # how its prompt is written: "alpaca" or the model's "chat" template


def detect_format(row: Mapping[str, Any]) -> str:
    """Guess the format of a raw row from its keys."""
    keys = set(row)
    if "messages" in keys:
        return "chat"
    if {"instruction", "response"} <= keys:
        return "dolly"
    if {"instruction", "output"} <= keys and "input" in keys:
        return "alpaca"
    if {"instruction", "output"} <= keys or "conversations" in keys:
        return "wizard"
    raise ConfigError(f"cannot tell the data format from the fields {sorted(keys)}; pass format=")


def to_example(row: Mapping[str, Any], fmt: str, where: str = "", label: str = "category") -> Example:
    """Map a raw row of format ``fmt`` to an ``Example``; ``where`` names the row in errors. The
    example's label (``category``) is the row's ``label`` column: any column can drive the split."""
    where = where or "row"
    try:
        if fmt == "dolly":
            ex = Example(
                row["instruction"], row["response"], row.get("context") or "", row.get("category") or ""
            )
        elif fmt == "alpaca":
            ex = Example(row["instruction"], row["output"], row.get("input") or "", row.get("category") or "")
        elif fmt == "wizard":
            ex = _wizard(row, where)
        elif fmt == "chat":
            ex = _chat(row, where)
        else:
            raise ConfigError(f"unknown data format {fmt!r}; choose one of {FORMATS}")
    except KeyError as err:
        raise ConfigError(f"{where} has no field {err.args[0]!r} required by the {fmt} format") from err
    if label != "category":
        value = row.get(label)
        if value is None or isinstance(value, (dict, list)):
            raise ConfigError(f"{where} has no value in column {label!r} (data.label) to split by")
        ex = replace(ex, category=str(value))
    return checked(ex, where)


def checked(ex: Example, where: str) -> Example:
    """``ex`` if every field is a string and instruction and response are not blank; else a
    ``ConfigError`` naming the row and the field (a ``null`` response, a number, an empty answer)."""
    for name in ("instruction", "response", "context", "category"):
        value = getattr(ex, name)
        if not isinstance(value, str):
            raise ConfigError(f"{where}: field {name!r} must be text, got {value!r:.40}")
    for name in ("instruction", "response"):
        if not getattr(ex, name).strip():
            raise ConfigError(f"{where}: field {name!r} is empty")
    return ex


def _chat(row: Mapping[str, Any], where: str) -> Example:
    turns = row["messages"]
    ok = isinstance(turns, list) and all(
        isinstance(t, Mapping) and t.get("role") in ROLES and isinstance(t.get("content"), str) for t in turns
    )
    if not ok:
        raise ConfigError(
            f"{where}: 'messages' must be a list of {{'role': system|user|assistant, 'content': text}}"
        )
    if len(turns) < 2 or turns[-1]["role"] != "assistant" or turns[-2]["role"] != "user":
        raise ConfigError(f"{where}: 'messages' must end with a user turn and then the assistant's answer")
    history = tuple((t["role"], t["content"]) for t in turns[:-2])
    return Example(turns[-2]["content"], turns[-1]["content"], category=str(row.get("category") or ""),
                   history=history)  # fmt: skip


def _wizard(row: Mapping[str, Any], where: str) -> Example:
    if "conversations" not in row:
        return Example(row["instruction"], row["output"], row.get("input") or "")
    turns = row["conversations"]
    if not isinstance(turns, list) or not all(isinstance(t, Mapping) for t in turns):
        raise ConfigError(f"{where}: 'conversations' must be a list of {{'from', 'value'}} objects")
    human = next((t.get("value") for t in turns if t.get("from") in ("human", "user")), None)
    answer = next((t.get("value") for t in turns if t.get("from") in ("gpt", "assistant")), None)
    if human is None or answer is None:
        raise ConfigError(
            f"{where}: 'conversations' needs a human (or user) turn and a gpt (or assistant) turn"
        )
    return Example(human, answer)
