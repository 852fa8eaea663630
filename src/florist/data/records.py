"""One instruction example, whatever data set it came from, and the field mappings that make it.

Dolly:   instruction, context, response, category
Alpaca:  instruction, input, output
WizardLM evol-instruct: instruction, output  (or ShareGPT-style "conversations")
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from florist.errors import ConfigError

FORMATS = ("dolly", "alpaca", "wizard")


@dataclass(frozen=True)
class Example:
    instruction: str
    response: str
    context: str = ""
    category: str = ""


def detect_format(row: Mapping[str, Any]) -> str:
    """Guess the format of a raw row from its keys."""
    keys = set(row)
    if {"instruction", "response"} <= keys:
        return "dolly"
    if {"instruction", "output"} <= keys and "input" in keys:
        return "alpaca"
    if {"instruction", "output"} <= keys or "conversations" in keys:
        return "wizard"
    raise ConfigError(f"cannot tell the data format from the fields {sorted(keys)}; pass format=")


def to_example(row: Mapping[str, Any], fmt: str, where: str = "") -> Example:
    """Map a raw row of format ``fmt`` to an ``Example``; ``where`` names the row in errors."""
    try:
        if fmt == "dolly":
            return Example(
                row["instruction"], row["response"], row.get("context") or "", row.get("category") or ""
            )
        if fmt == "alpaca":
            return Example(
                row["instruction"], row["output"], row.get("input") or "", row.get("category") or ""
            )
        if fmt == "wizard":
            return _wizard(row)
    except KeyError as err:
        raise ConfigError(
            f"{where or 'row'} has no field {err.args[0]!r} required by the {fmt} format"
        ) from err
    raise ConfigError(f"unknown data format {fmt!r}; choose one of {FORMATS}")


def _wizard(row: Mapping[str, Any]) -> Example:
    if "conversations" in row:
        turns = row["conversations"]
        human = next(t["value"] for t in turns if t.get("from") in ("human", "user"))
        answer = next(t["value"] for t in turns if t.get("from") in ("gpt", "assistant"))
        return Example(human, answer)
    return Example(row["instruction"], row["output"], row.get("input") or "")
