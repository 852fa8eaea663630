"""The configs shipped inside the package (``src/florist/configs/``)."""

from __future__ import annotations

from pathlib import Path

PACKAGED = Path(__file__).resolve().parent.parent / "configs"
DEMO_CONFIG = str(PACKAGED / "demo.toml")  # florist demo
PAPER_CONFIG = str(PACKAGED / "paper_cpu.toml")  # florist bench and florist regime
