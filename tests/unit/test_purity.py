"""The math stays apart from transport: aggregation/ and lora/ import neither Flower nor transformers."""

from __future__ import annotations

import subprocess
import sys


def test_aggregation_and_lora_do_not_import_flower_transformers_or_peft() -> None:
    code = (
        "import sys, florist.aggregation, florist.lora, florist.lora.peft_io; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'flwr', 'transformers', 'peft'}); "
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"imported: {out.stdout.strip()}"
