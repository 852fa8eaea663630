"""The math stays apart from transport: aggregation/ and lora/ import neither Flower nor transformers;
server/ imports no Flower; config/ is the root; no import cycles between packages."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path


def test_aggregation_and_lora_do_not_import_flower_transformers_or_peft() -> None:
    code = (
        "import sys, florist.aggregation, florist.lora, florist.lora.peft_io; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'flwr', 'transformers', 'peft'}); "
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"imported: {out.stdout.strip()}"


# ---------------------------------------------------------------- the package graph (static, every import)

SRC = Path(__file__).resolve().parents[2] / "src" / "florist"


def _imports() -> dict[str, set[str]]:
    """package -> every module it imports, at any level (functions included)."""
    out: dict[str, set[str]] = defaultdict(set)
    for f in SRC.rglob("*.py"):
        rel = f.relative_to(SRC)
        package = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                out[package].add(node.module)
                if node.module == "florist":
                    out[package].update(f"florist.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                out[package].update(a.name for a in node.names)
    return out


def _package_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for package, modules in _imports().items():
        for m in modules:
            parts = m.split(".")
            if parts[0] == "florist" and len(parts) > 1 and parts[1] != package:
                graph[package].add(parts[1])
    return graph


def test_server_imports_no_flower_and_config_no_client_data_or_commands() -> None:
    imports = _imports()
    assert not [m for m in imports["server"] if m.split(".")[0] == "flwr"]
    banned = {"florist.client", "florist.data", "florist.tools", "florist.studies", "florist.flower"}
    assert not [m for m in imports["config"] if any(m == b or m.startswith(b + ".") for b in banned)]


def test_no_package_imports_the_commands_and_the_cli_names_each_one() -> None:
    import importlib

    from florist.cli import COMMANDS

    users = sorted(p for p, targets in _package_graph().items() if "commands" in targets)
    assert users == [], users  # florist.cli imports a command's module by its name, when it runs
    for name, (module, _) in COMMANDS.items():
        found = importlib.import_module(module)
        assert callable(found.add_arguments) and callable(found.main), name


def test_no_import_cycles_between_packages() -> None:
    graph = _package_graph()
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError(f"import cycle: {' -> '.join([*path[path.index(nxt) :], nxt])}")
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_only_aggregation_branches_on_the_client_protocol() -> None:
    """What each client protocol means lives in ``florist.aggregation.protocols``: no module outside
    aggregation/ compares a protocol name (naming one to construct something is fine)."""
    import re

    branch = re.compile(r"(\bis\b|\bis not\b|==|!=|\bin\b)\s*\(?\s*ClientProtocol\.|protocol\.merges")
    offenders = [
        f"{f.relative_to(SRC)}:{i}"
        for f in SRC.rglob("*.py")
        if f.relative_to(SRC).parts[0] != "aggregation"
        for i, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1)
        if branch.search(line)
    ]
    assert offenders == []
