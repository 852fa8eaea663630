"""Each client's training examples and the server's held-out set, from a ``DataConfig``.

Every node calls ``client_examples`` with its own index and gets the same split as every other
node would compute for it: the split depends on the config and its seed only.

    source = "skills"            the embedded skills set, split by skill (Dirichlet) or IID
    source = FOLDER, presplit    one file per client (sorted), e.g. ../shared/data/dolly-8clients
    source = FILE / FOLDER / hub id, iid or dirichlet over ``label``

A validation split (``data.validation_per_label = n``) withholds n training rows per category
(``Example.category``), chosen by a seeded draw over every client's rows together, from the
clients before anything trains: the server scores it to choose settings, and ``data.test`` is kept
for the final tables. Each client trains on, and is weighted by, the rows it still has. For the
Dolly 8-client split, n = 10 withholds 80 rows (10 from each of the 8 categories).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

from florist.config.schema import DataConfig
from florist.data.loaders import SUFFIXES, load_examples, looks_like_hub_id
from florist.data.partition import dirichlet_partition, iid_partition, label_partition
from florist.data.records import Example
from florist.data.skills import make_skills_dataset
from florist.errors import ConfigError


def client_examples(cfg: DataConfig, client: int, num_clients: int) -> list[Example]:
    """Training examples of client ``client`` (0-based) out of ``num_clients``."""
    if not 0 <= client < num_clients:
        raise ConfigError(f"client index {client} is outside [0, {num_clients})")
    parts = _training_parts(cfg, num_clients)
    return subsample(list(parts[client]), cfg, client)


def validation_examples(cfg: DataConfig, num_clients: int) -> list[Example]:
    """The rows withheld from the clients for choosing settings (empty without a validation split)."""
    return templated(_validation(cfg, num_clients)[1], cfg)


def subsample(examples: list[Example], cfg: DataConfig, client: int) -> list[Example]:
    """At most ``data.max_examples_per_client`` of ``examples``, a seeded sample kept in order."""
    chosen = set(_kept(len(examples), cfg, client))
    return templated([ex for i, ex in enumerate(examples) if i in chosen], cfg)


def client_left_out(cfg: DataConfig, client: int, num_clients: int) -> list[Example]:
    """The rows of client ``client``'s part that ``data.max_examples_per_client`` left out, in the
    part's order: drawn from the same distribution as its training rows and never trained on by
    anyone (a membership attack's non-members). Empty without a cap, or when the part fits it."""
    part = list(_training_parts(cfg, num_clients)[client])
    kept = set(_kept(len(part), cfg, client))
    return templated([ex for i, ex in enumerate(part) if i not in kept], cfg)


def _kept(n: int, cfg: DataConfig, client: int) -> list[int]:
    """The indices, sorted, that ``subsample`` keeps of a part of ``n`` rows."""
    cap = cfg.max_examples_per_client
    if cap is None or n <= cap:
        return list(range(n))
    return sorted(random.Random(f"{cfg.seed}:subsample:{client}").sample(range(n), cap))


def templated(examples: Sequence[Example], cfg: DataConfig) -> list[Example]:
    """The examples in ``data.template``: every source of rows (a client's, a node's own file, the
    validation and the test rows) passes here, so training and scoring write the same prompts."""
    return [ex if ex.template == cfg.template else replace(ex, template=cfg.template) for ex in examples]


def test_examples(cfg: DataConfig) -> list[Example]:
    """The held-out set the server evaluates on."""
    return templated(_test(cfg), cfg)


def _test(cfg: DataConfig) -> list[Example]:
    if cfg.source == "skills":
        return _skills(cfg)[1]
    if cfg.test is not None:
        return load_examples(cfg.test, fmt=cfg.format, split="test")
    if cfg.split == "presplit":
        raise ConfigError("data.split = 'presplit' needs data.test, a held-out file")
    return list(_pooled(cfg)[1])


def _training_parts(cfg: DataConfig, num_clients: int) -> tuple[tuple[Example, ...], ...]:
    return _validation(cfg, num_clients)[0] if cfg.validation_per_label else _partitions(cfg, num_clients)


@lru_cache(maxsize=4)
def _validation(
    cfg: DataConfig, num_clients: int
) -> tuple[tuple[tuple[Example, ...], ...], tuple[Example, ...]]:
    """(each client's rows without the validation rows, the validation rows in a fixed order)."""
    parts = _partitions(cfg, num_clients)
    by_label: dict[str, list[tuple[int, int]]] = {}
    for k, part in enumerate(parts):
        for i, ex in enumerate(part):
            by_label.setdefault(ex.category or "none", []).append((k, i))
    n = cfg.validation_per_label
    held: list[tuple[int, int]] = []
    for label in sorted(by_label):
        rows = by_label[label]
        if len(rows) <= n:
            raise ConfigError(
                f"data.validation_per_label = {n}, but category {label!r} has only {len(rows)} training rows"
            )
        held += sorted(random.Random(f"{cfg.seed}:validation:{label}").sample(rows, n))
    gone = set(held)
    train = tuple(tuple(ex for i, ex in enumerate(p) if (k, i) not in gone) for k, p in enumerate(parts))
    if any(not p for p in train):
        raise ConfigError("the validation split leaves a client with no training rows; lower it")
    return train, tuple(parts[k][i] for k, i in held)


@lru_cache(maxsize=4)
def _partitions(cfg: DataConfig, num_clients: int) -> tuple[tuple[Example, ...], ...]:
    if cfg.split == "presplit":
        return _presplit(cfg, num_clients)
    train = _skills(cfg)[0] if cfg.source == "skills" else list(_pooled(cfg)[0])
    if cfg.split == "iid":
        parts = iid_partition(train, num_clients, cfg.seed, cfg.min_partition_size)
    elif cfg.split == "by_label":
        parts = label_partition(train, num_clients, _label, cfg.label)
    else:
        parts = dirichlet_partition(train, num_clients, cfg.alpha, _label, cfg.seed, cfg.min_partition_size)
    return tuple(tuple(p) for p in parts)


def _label(ex: Example) -> str:
    """The example's label: its ``data.label`` column, read when it was loaded."""
    return ex.category or "none"


def _presplit(cfg: DataConfig, num_clients: int) -> tuple[tuple[Example, ...], ...]:
    return tuple(
        tuple(load_examples(f, fmt=cfg.format, label=cfg.label)) for f in client_files(cfg, num_clients)
    )


def client_files(cfg: DataConfig, num_clients: int) -> list[Path]:
    """The pre-split folder's client files, one per client, or ``ConfigError`` saying what is wrong."""
    folder = Path(cfg.source)
    if not folder.exists():
        where = "" if folder.is_absolute() else f", read from the current directory {str(Path.cwd())!r}"
        raise ConfigError(
            f"data.source {cfg.source!r} does not exist{where}: give data.source=FOLDER and data.test=FILE "
            "for your copy of the data"
        )
    if not folder.is_dir():
        raise ConfigError(f"data.source {cfg.source!r} must be a folder for data.split = 'presplit'")
    files = sorted(p for p in folder.iterdir() if p.suffix in SUFFIXES and p.name not in cfg.exclude)
    if len(files) != num_clients:
        raise ConfigError(
            f"data.source {cfg.source!r} holds {len(files)} client files "
            f"({[f.name for f in files][:10]}), but federation.num_clients = {num_clients}"
        )
    return files


def preflight(cfg: DataConfig, num_clients: int) -> None:
    """What the config alone can tell, checked before any process starts (no example is loaded)."""
    if cfg.split == "presplit":
        client_files(cfg, num_clients)
        if cfg.test is None:
            raise ConfigError("data.split = 'presplit' needs data.test, a held-out file")
    if (
        cfg.test is not None
        and cfg.source != "skills"
        and Path(cfg.source).exists()
        and not Path(cfg.test).exists()
    ):
        raise ConfigError(f"data.test {cfg.test!r} does not exist")


def check_data(cfg: DataConfig, num_clients: int) -> None:
    """Load every client's examples and the held-out set once, when the data is local (a file, a
    folder or the skills set), so that a bad file stops the run in one line naming file, line and
    field before any node starts; a hub data set is left to the nodes that download it."""
    preflight(cfg, num_clients)
    if cfg.source != "skills" and not Path(cfg.source).exists() and looks_like_hub_id(cfg.source):
        return
    for k in range(num_clients):
        client_examples(cfg, k, num_clients)
    test_examples(cfg)
    validation_examples(cfg, num_clients)


@lru_cache(maxsize=2)
def _skills(cfg: DataConfig) -> tuple[list[Example], list[Example]]:
    return make_skills_dataset(cfg.skills_train, cfg.skills_test, cfg.seed)


@lru_cache(maxsize=2)
def _pooled(cfg: DataConfig) -> tuple[tuple[Example, ...], tuple[Example, ...]]:
    """(train, held-out): the held-out part is a seeded fraction unless data.test names a file."""
    examples = load_examples(cfg.source, fmt=cfg.format, exclude=cfg.exclude, label=cfg.label)
    if cfg.test is not None:
        return tuple(examples), ()
    order = list(range(len(examples)))
    random.Random(f"{cfg.seed}:heldout").shuffle(order)
    n_test = max(1, round(cfg.test_fraction * len(examples)))
    held = set(order[:n_test])
    train = tuple(ex for i, ex in enumerate(examples) if i not in held)
    return train, tuple(examples[i] for i in sorted(held))
