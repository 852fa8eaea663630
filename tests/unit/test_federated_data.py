"""Each node computes the same split for itself; pre-split folders; the held-out set."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from florist.config import load_config
from florist.config.schema import DataConfig
from florist.data.federated import client_examples
from florist.data.federated import test_examples as heldout_examples
from florist.data.records import Example
from florist.errors import ConfigError
from tests.helpers import SHARED_DATA


def write_clients(folder: Path, sizes: list[int]) -> None:
    folder.mkdir()
    for k, n in enumerate(sizes):
        rows = [
            {"instruction": f"q{k}-{i}", "context": "", "response": f"a{i}", "category": "qa"}
            for i in range(n)
        ]
        (folder / f"client_{k}.json").write_text(json.dumps(rows))
    (folder / "test.json").write_text(json.dumps([{"instruction": "t", "input": "", "output": "u"}]))


def test_skills_split_is_deterministic_disjoint_and_complete() -> None:
    cfg = load_config(None, ["data.skills_train=10", "data.skills_test=3", "data.alpha=0.3"])
    parts = [client_examples(cfg.data, k, 4) for k in range(4)]
    again = [
        client_examples(
            load_config(None, ["data.skills_train=10", "data.skills_test=3", "data.alpha=0.3"]).data, k, 4
        )
        for k in range(4)
    ]
    assert parts == again
    assert sum(len(p) for p in parts) == 70 and len(heldout_examples(cfg.data)) == 21
    test_prompts = {(ex.instruction, ex.context) for ex in heldout_examples(cfg.data)}
    assert not test_prompts & {(ex.instruction, ex.context) for p in parts for ex in p}
    other = [
        client_examples(load_config(None, ["data.skills_train=10", "data.seed=1"]).data, k, 4)
        for k in range(4)
    ]
    assert other != parts


def test_presplit_folder_and_subsample(tmp_path: Path) -> None:
    write_clients(tmp_path / "sites", [5, 3, 8])
    base = [f"data.source={str(tmp_path / 'sites')!r}", "data.split='presplit'", "federation.num_clients=3",
            f"data.test={str(tmp_path / 'sites' / 'test.json')!r}"]  # fmt: skip
    cfg = load_config(None, base)
    assert [len(client_examples(cfg.data, k, 3)) for k in range(3)] == [5, 3, 8]
    assert client_examples(cfg.data, 1, 3)[0].instruction == "q1-0"
    assert heldout_examples(cfg.data)[0].response == "u"  # the Alpaca-format held-out file
    capped = load_config(None, [*base, "data.max_examples_per_client=4"])
    got = client_examples(capped.data, 2, 3)
    assert len(got) == 4 and got == client_examples(capped.data, 2, 3)
    with pytest.raises(ConfigError, match=r"holds 3 client files .* but federation.num_clients = 4"):
        client_examples(
            load_config(None, [*base[:2], "federation.num_clients=4", "lora.ranks=[4]"]).data, 0, 4
        )


def test_pooled_file_gets_a_seeded_heldout_split(tmp_path: Path) -> None:
    rows = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(40)]
    (tmp_path / "alpaca.json").write_text(json.dumps(rows))
    cfg = load_config(None, [f"data.source={str(tmp_path / 'alpaca.json')!r}", "data.split='iid'",
                             "data.test_fraction=0.1", "federation.num_clients=2"])  # fmt: skip
    held = heldout_examples(cfg.data)
    train = client_examples(cfg.data, 0, 2) + client_examples(cfg.data, 1, 2)
    assert len(held) == 4 and len(train) == 36
    assert not {e.instruction for e in held} & {e.instruction for e in train}


@pytest.mark.skipif(
    not (SHARED_DATA / "dolly-8clients").is_dir(), reason=f"{SHARED_DATA}/dolly-8clients is absent"
)
def test_the_papers_dolly_clients() -> None:
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "dolly.toml",
                      [f"data.source={str(SHARED_DATA / 'dolly-8clients')!r}",
                       f"data.test={str(SHARED_DATA / 'dolly-8clients' / 'test.json')!r}",
                       "data.max_examples_per_client=none"])  # fmt: skip
    sizes = [len(client_examples(cfg.data, k, 8)) for k in range(8)]
    assert sizes == [1579, 685, 3775, 1830, 2152, 1776, 2531, 607]
    assert len(heldout_examples(cfg.data)) == 80


def test_validation_split_withholds_rows_per_category_from_the_clients() -> None:
    from florist.data.federated import validation_examples

    keys = ["data.skills_train=10", "data.skills_test=3", "data.alpha=0.3"]
    full = [client_examples(load_config(None, keys).data, k, 4) for k in range(4)]
    cfg = load_config(None, [*keys, "data.validation_per_label=2"])
    parts = [client_examples(cfg.data, k, 4) for k in range(4)]
    val = validation_examples(cfg.data, 4)
    cats = sorted({ex.category for p in full for ex in p})
    assert sorted(ex.category for ex in val) == sorted(c for c in cats for _ in range(2))  # 2 per category
    withheld: Counter[Example] = Counter()
    for k in range(4):  # each client keeps its rows in order, less the withheld ones
        rest = iter(full[k])
        assert all(any(ex == other for other in rest) for ex in parts[k])  # an ordered subsequence
        withheld += Counter(full[k]) - Counter(parts[k])
    assert withheld == Counter(val)
    assert sum(len(p) for p in parts) + len(val) == sum(len(p) for p in full)
    assert val == validation_examples(load_config(None, [*keys, "data.validation_per_label=2"]).data, 4)
    assert not {(e.instruction, e.context) for e in val} & {
        (e.instruction, e.context) for e in heldout_examples(cfg.data)
    }
    assert validation_examples(load_config(None, keys).data, 4) == []
    with pytest.raises(ConfigError, match="category .* has only"):
        client_examples(load_config(None, [*keys, "data.validation_per_label=10"]).data, 0, 4)
    with pytest.raises(ConfigError, match="validation_per_label must be >= 0"):
        load_config(None, ["data.validation_per_label=-1"])


@pytest.mark.skipif(not (SHARED_DATA / "dolly-8clients").is_dir(), reason="../shared/data is absent")
def test_dolly_validation_split_is_80_rows_disjoint_from_test() -> None:
    from florist.data.federated import validation_examples

    src = SHARED_DATA / "dolly-8clients"
    cfg = load_config(None, [f"data.source={str(src)!r}", "data.split='presplit'", f"data.test={str(src / 'test.json')!r}",
                             "data.validation_per_label=10", "federation.num_clients=8"])  # fmt: skip
    val = validation_examples(cfg.data, 8)
    assert len(val) == 80 and len({ex.category for ex in val}) == 8
    sizes = [len(client_examples(cfg.data, k, 8)) for k in range(8)]
    assert sum(sizes) == 1579 + 685 + 3775 + 1830 + 2152 + 1776 + 2531 + 607 - 80
    test = {(e.instruction, e.context, e.response) for e in heldout_examples(cfg.data)}
    assert not test & {(e.instruction, e.context, e.response) for e in val}


def _sites(tmp_path: Path) -> Path:
    """One JSONL file whose rows carry a ``site`` column: 3 sites of 4, 5 and 6 rows."""
    rows = [
        {
            "instruction": f"q{s}-{i}",
            "context": "",
            "response": f"a{i}",
            "category": "qa",
            "site": f"site-{s}",
        }
        for s, n in enumerate([4, 5, 6])
        for i in range(n)
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_by_label_gives_each_value_of_any_column_its_own_client(tmp_path: Path) -> None:
    """``data.split = "by_label"`` with ``data.label = "site"``: client k holds every training row of
    the k-th site (sorted), whatever column it is; the Dirichlet split groups by that column too."""
    source = _sites(tmp_path)
    base = [
        f"data.source={str(source)!r}",
        "data.label='site'",
        "data.test_fraction=0.01",
        "federation.num_clients=3",
    ]
    cfg = load_config(None, [*base, "data.split='by_label'"])
    parts = [client_examples(cfg.data, k, 3) for k in range(3)]
    held = heldout_examples(cfg.data)
    assert [{ex.category for ex in p} for p in parts] == [{"site-0"}, {"site-1"}, {"site-2"}]
    assert sum(len(p) for p in parts) + len(held) == 15
    assert all(ex.instruction.startswith(f"q{k}-") for k, p in enumerate(parts) for ex in p)
    dirichlet = load_config(None, [*base, "data.split='dirichlet'", "data.alpha=0.01"])
    labels = Counter(ex.category for k in range(3) for ex in client_examples(dirichlet.data, k, 3))
    assert set(labels) <= {"site-0", "site-1", "site-2"}


def test_by_label_names_the_mismatch_and_a_missing_column(tmp_path: Path) -> None:
    source = _sites(tmp_path)
    cfg = load_config(None, [f"data.source={str(source)!r}", "data.label='site'", "data.split='by_label'",
                             "federation.num_clients=4"])  # fmt: skip
    with pytest.raises(
        ConfigError, match=r"one client per value of 'site': 3 values .* federation.num_clients = 4"
    ):
        client_examples(cfg.data, 0, 4)
    cfg = load_config(
        None, [f"data.source={str(source)!r}", "data.label='hospital'", "federation.num_clients=3"]
    )
    with pytest.raises(ConfigError, match=r"row 0 has no value in column 'hospital' \(data.label\)"):
        client_examples(cfg.data, 0, 3)


def test_left_out_rows_are_the_clients_own_and_held_by_nobody(tmp_path: Path) -> None:
    """The membership attack's non-members: rows of client 0's part the cap dropped (unique rows, so
    "held by nobody" is checked row by row)."""
    from florist.data.federated import client_left_out

    write_clients(tmp_path / "sites", [12, 9, 10])
    cfg = DataConfig(source=str(tmp_path / "sites"), split="presplit", test=str(tmp_path / "sites" / "test.json"),
                     max_examples_per_client=5)  # fmt: skip
    kept = [client_examples(cfg, k, 3) for k in range(3)]
    left = client_left_out(cfg, 0, 3)
    uncapped = client_examples(replace(cfg, max_examples_per_client=None), 0, 3)
    assert len(kept[0]) == 5 and len(left) == 12 - 5
    assert sorted(x.instruction for x in kept[0] + left) == sorted(x.instruction for x in uncapped)
    held = {x.instruction for part in kept for x in part}
    assert all(x.instruction.startswith("q0-") and x.instruction not in held for x in left)
    assert client_left_out(replace(cfg, max_examples_per_client=None), 0, 3) == []
