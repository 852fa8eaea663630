"""``florist eval``: a run's adapter scored by lm-evaluation-harness on a local task, offline.

The log-likelihoods lm-eval reports are recomputed by hand with the PeftModel and with the bare base
(so the adapter really is on, and off for ``--with-base``), accuracy and the paired difference
follow from them, and the CLI writes its results into the run directory or fails in one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from florist.cli import main
from florist.lora import LoraFactors
from florist.lora.peft_io import PROMPT_FILE, write_adapter
from florist.server.global_model import adapted_shapes
from tests.flower_helpers import save_tiny_model
from tests.peft_helpers import tiny_llama
from tests.tiny_tokenizer import VOCAB_SIZE

pytest.importorskip("lm_eval", reason="florist eval needs the eval extra (make install has it)")
pytestmark = pytest.mark.integration

ROWS = [{"question": f"Is {i} even?", "choices": ["yes", "no", "maybe"], "answer": i % 2} for i in range(8)]


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A run directory as ``florist run`` leaves it: RUN/adapter on a tiny local base."""
    model = save_tiny_model(tmp_path / "tiny")
    shapes = adapted_shapes(tiny_llama(0, vocab_size=VOCAB_SIZE), ("q_proj", "v_proj"))
    g = torch.Generator().manual_seed(5)
    modules = {name: LoraFactors(A=torch.randn(4, n, generator=g), B=0.5 * torch.randn(m, 4, generator=g),
                                 scaling=1.0) for name, (m, n) in shapes.items()}  # fmt: skip
    run = tmp_path / "runs" / "florist-x"
    write_adapter(run / "adapter", modules, base_model=str(model))
    (run / "adapter" / PROMPT_FILE).write_text(json.dumps({"template": "alpaca"}))
    return run


@pytest.fixture
def tasks(tmp_path: Path) -> Path:
    """A folder with one multiple-choice task whose documents are a local JSONL file."""
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "tiny.yaml").write_text(
        "task: florist_tiny\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {rows}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "Q: {{question}}\\nA:"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return folder


def loglikelihood(model: torch.nn.Module, tok: object, context: str, continuation: str) -> float:
    """log p(continuation | context), summed over the continuation's tokens, as lm-eval defines it."""
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
    n_ctx = len(tok(context, add_special_tokens=False)["input_ids"])  # type: ignore[operator]
    ids = torch.tensor([whole[:-1]])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    return float(sum(logp[i - 1, whole[i]] for i in range(n_ctx, len(whole))))


def test_the_adapters_scores_are_its_own_and_the_base_is_scored_without_it(
    run_dir: Path, tasks: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from florist.eval.harness import evaluate

    report = evaluate(str(run_dir), ["florist_tiny"], include=[str(tasks)], with_base=True, batch_size=3,
                      device="cpu", keep_samples=True)  # fmt: skip
    base_dir = str(run_dir.parent.parent / "tiny")
    tok = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    peft = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir), str(run_dir / "adapter")
    ).eval()
    acc = {}
    for who, model in (("adapter", peft), ("base", base)):
        samples = sorted(report["samples"][who]["florist_tiny"], key=lambda s: s["doc_id"])
        assert [s["doc_id"] for s in samples] == list(range(len(ROWS)))
        hits = []
        for s, row in zip(samples, ROWS, strict=True):
            ours = [loglikelihood(model, tok, f"Q: {row['question']}\nA:", f" {c}") for c in row["choices"]]
            theirs = [r[0] for r in s["filtered_resps"]]
            assert theirs == pytest.approx(ours, abs=1e-3)
            hits.append(float(max(range(3), key=lambda i: ours[i]) == row["answer"]))
            assert s["acc"] == hits[-1]
        acc[who] = sum(hits) / len(hits)
        assert report["results"][who]["florist_tiny"]["acc,none"] == pytest.approx(acc[who])
    a = [
        s["filtered_resps"][0][0]
        for s in sorted(report["samples"]["adapter"]["florist_tiny"], key=lambda s: s["doc_id"])
    ]
    b = [
        s["filtered_resps"][0][0]
        for s in sorted(report["samples"]["base"]["florist_tiny"], key=lambda s: s["doc_id"])
    ]
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) > 1e-2  # the adapter changes the scores
    d = report["paired"]["florist_tiny"]["acc,none"]
    assert d["n"] == len(ROWS) and d["mean"] == pytest.approx(acc["adapter"] - acc["base"])
    assert d["low"] <= d["mean"] <= d["high"]
    assert report["base_model"] == base_dir and report["settings"]["chat_template"] is False


def test_cli_writes_the_results_into_the_run(
    run_dir: Path, tasks: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "eval",
        str(run_dir),
        "--tasks",
        "florist_tiny",
        "--include",
        str(tasks),
        "--limit",
        "5",
        "--device",
        "cpu",
    ]
    assert main(argv) == 0
    (out,) = (run_dir / "lm_eval").glob("results-*.json")
    report = json.loads(out.read_text())
    assert report["n_samples"]["florist_tiny"]["effective"] == 5
    assert 0 <= report["results"]["adapter"]["florist_tiny"]["acc,none"] <= 1
    assert "base" not in report["results"] and "samples" not in report
    printed = capsys.readouterr().out
    assert "florist_tiny" in printed and str(out) in printed


def test_bad_requests_fail_in_one_line(
    run_dir: Path, tasks: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["eval", str(run_dir), "--tasks", "florist_tiyn", "--include", str(tasks)]) == 2
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1 and "unknown task florist_tiyn" in err and "florist_tiny" in err
    )  # the nearest
    assert main(["eval", str(run_dir), "--tasks", "florist_tiny", "--include", str(tasks / "nope")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert main(["eval", str(run_dir.parent), "--tasks", "florist_tiny"]) == 2
    assert "neither a run directory" in capsys.readouterr().err
    (run_dir / "adapter" / PROMPT_FILE).write_text("{not json")
    assert main(["eval", str(run_dir), "--tasks", "florist_tiny", "--include", str(tasks)]) == 2
    assert "is not florist's prompt record" in capsys.readouterr().err
    assert not (run_dir / "lm_eval").exists()


def test_a_chat_adapter_is_scored_through_the_chat_template(run_dir: Path, tasks: Path) -> None:
    from florist.eval.harness import evaluate

    (run_dir / "adapter" / PROMPT_FILE).write_text(json.dumps({"template": "chat"}))
    tok_dir = run_dir.parent.parent / "tiny"
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(config))
    report = evaluate(
        str(run_dir), ["florist_tiny"], include=[str(tasks)], limit=2, device="cpu", keep_samples=True
    )
    assert report["settings"]["chat_template"] is True and report["settings"]["adapter_template"] == "chat"
    context = report["samples"]["adapter"]["florist_tiny"][0]["arguments"][0][0]
    assert context.startswith("<user>Q: Is ")
    off = evaluate(str(run_dir), ["florist_tiny"], include=[str(tasks)], limit=2, device="cpu",
                   chat_template="off", keep_samples=True)  # fmt: skip
    assert off["samples"]["adapter"]["florist_tiny"][0]["arguments"][0][0].startswith("Q: Is ")
