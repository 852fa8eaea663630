"""The privacy study shares its cells between processes: a claimed cell is skipped, finished cells
merge into one results file (the same command started twice uses two cores), and a cell whose holder
died is taken up."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any

import pytest

from florist import fsutil
from florist.studies import privacy


def test_a_cell_claimed_by_another_process_is_skipped_and_results_merge(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opts = privacy.StudyOptions(out=str(tmp_path / "out"), cache=str(tmp_path / "cache"),
                                epsilons=(math.inf,), modes=("dp-sgd",))  # fmt: skip
    labels = [label for label, _ in privacy.METHODS["dp-sgd"]]
    taken = privacy.cell_key("dp-sgd", "FLoRA", math.inf)
    holder = contextlib.ExitStack()  # the other process, holding the FLoRA cell
    ran: list[str] = []

    def fake_cell(opts: Any, mode: str, key: str, keys: Any, eps: float) -> list[dict[str, Any]]:
        ran.append(key)
        if key == privacy.cell_key("dp-sgd", labels[-1], math.inf):
            holder.close()  # the other process dies while this one runs its last cell
        return [{"round": 1, "eval": {}}]

    monkeypatch.setattr(privacy, "run_cell", fake_cell)
    monkeypatch.setattr(privacy, "base_cell", lambda opts, mode: [{"round": 0, "base": mode}])
    monkeypatch.setattr(privacy, "write_report", lambda out, results: None)
    other = {"dp-sgd / FedIT / eps=inf": [{"round": 1, "by": "other"}]}  # the other process finished it
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "results.json").write_text(json.dumps(other))
    with holder:
        assert holder.enter_context(fsutil.file_lock(privacy.cell_folder(opts, taken) / ".claim"))
        results = privacy.run(opts)
    first_pass = [privacy.cell_key("dp-sgd", x, math.inf) for x in labels if x not in ("FedIT", "FLoRA")]
    assert ran == [*first_pass, taken]  # the dead holder's cell, on the second pass
    assert results["dp-sgd / FedIT / eps=inf"] == [{"round": 1, "by": "other"}]  # merged, not redone
    assert results["dp-sgd / base model / eps=inf"] == [{"round": 0, "base": "dp-sgd"}]
    assert len(results) == len(labels) + 1
    assert privacy.run(opts) == results and len(ran) == len(labels) - 1  # all done: nothing runs
