"""A user's own ServerApp and ClientApp (``examples/own_flower_app``), built on florist's public API
only, run florist's strategy under Flower's ``Strategy.start()`` loop in simulation.

The adapter it writes equals the one ``florist run`` writes for the same config (same clients, same
seeds, the same rounds), products compared in float64; with a client that sits out a round, so the
catch-up path is the one ``Strategy.start()`` drives too. Its server-side evaluation is reported.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

from florist.flower.simulation import Simulation, run_simulation
from florist.lora.peft_io import read_adapter
from tests.flower_helpers import save_tiny_model, tiny_run_config
from tests.helpers import assert_product_close

pytestmark = pytest.mark.integration
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "own_flower_app"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


def test_own_app_under_strategy_start_writes_the_adapter_florist_run_writes(
    model_dir: Path, tmp_path: Path
) -> None:
    source = (EXAMPLE / "own_app.py").read_text()
    imported = [line for line in source.splitlines() if line.startswith(("from florist", "import florist"))]
    assert imported == [
        "from florist.config import FloristConfig, from_flower_run_config",
        "from florist.flower import FederatedLoRA, client_hello, client_init, client_train",
    ]  # the public API only

    schedule = "federation.participation=[[0, 1, 2], [0, 2], [0, 1, 2]]"  # client 1 catches up in round 3
    ours = tiny_run_config(
        model_dir, tmp_path, "florist-run", "federation.rounds=3", schedule, "eval.every=3"
    )
    theirs = tiny_run_config(model_dir, tmp_path, "own-app", "federation.rounds=3", schedule, "eval.every=3")
    stream = io.StringIO()
    with Simulation(tmp_path / "link", app=EXAMPLE, echo=stream) as sim:  # `flwr run examples/own_flower_app`
        sim.start()
        assert sim.run(theirs) is None  # it ran to its end and, being not florist's app, handed back nothing
    written = tmp_path / "own-app" / "adapter"
    assert (written / "adapter_model.safetensors").is_file(), stream.getvalue()[-3000:]
    assert "server-side evaluation" in stream.getvalue() and "heldout_loss" in stream.getvalue()

    summary = run_simulation(ours)
    want = {n: f.delta(torch.float64) for n, f in read_adapter(Path(summary["adapter"])).modules.items()}
    got = {n: f.delta(torch.float64) for n, f in read_adapter(written).modules.items()}
    assert sorted(got) == sorted(want)
    for name in want:
        assert_product_close(got[name], want[name], rtol=1e-5)
