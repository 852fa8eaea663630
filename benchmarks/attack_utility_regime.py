"""Is there a membership signal to find in the privacy study's utility regime? The reference-model
attack on one finished cell's final model (from its checkpoint under ``runs/privacy-cache``): the
rows client 0's data stream trained on (its first 80 positions; 96 were drawn in 3 rounds) against
80 rows of its own it never drew (the stream's last positions), one distribution, each row's loss
under the final model less its loss under the base model.

    .venv/bin/python benchmarks/attack_utility_regime.py "dp-sgd / FLoRA / eps=inf" \
        runs/privacy-cache/dp-sgd__FLoRA__eps-inf train.examples=32 train.batch_size=8

Prints the mean loss drop of both row sets and the attack's AUC with its 95 % interval. The study's
``attack`` mode (``florist.studies.privacy``) exists because this finds nothing.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from florist.client.local import client_id
from florist.client.train import BatchStream
from florist.data.federated import client_examples
from florist.data.records import Example
from florist.data.tokenize import IGNORE, encode
from florist.eval.membership import calibrated, loss_threshold_attack
from florist.seeds import derive_seed
from florist.studies import privacy
from florist.studies.simulate import Variant


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cell", help='a study cell, e.g. "dp-sgd / FLoRA / eps=inf"')
    p.add_argument("checkpoint", type=Path, help="its folder under runs/privacy-cache (the last round)")
    p.add_argument("overrides", nargs="*", help="the study's overrides")
    p.add_argument("--rows", type=int, default=80)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    mode, label, eps = args.cell.split(" / ")
    opts = privacy.StudyOptions(overrides=tuple(args.overrides))
    cfg = privacy.cell_config(opts, mode, dict(privacy.METHODS[mode])[label], float(eps.removeprefix("eps=")))
    trained = Variant(cfg)
    trained.resume(args.checkpoint)
    final, base = trained.server.model, Variant(cfg).server.model
    assert final is not None and base is not None
    # the client's stream as training draws it (florist.client.local: encoded rows, seeded order)
    rows = client_examples(cfg.data, 0, cfg.federation.num_clients)
    pairs = [(x, encode(x, final.tokenizer, cfg.train.max_length)) for x in rows]
    pairs = [(x, e) for x, e in pairs if any(t != IGNORE for t in e.labels)]  # as encode_all keeps
    kept = [x for x, _ in pairs]
    stream = BatchStream([e for _, e in pairs], 1, derive_seed(cfg.federation.seed, client_id(0), "data"))
    order = [stream.rows(0, len(kept))]
    drawn = cfg.federation.rounds * cfg.train.examples_per_round(len(kept))
    n = args.rows
    if len(kept) - n < drawn:
        raise SystemExit(f"client 0 holds {len(kept)} rows: too few for {n} never drawn beyond {drawn} drawn")
    members, never = [kept[i] for i in order[0][:n]], [kept[i] for i in order[0][-n:]]

    def losses(examples: list[Example], m: Any) -> list[float]:
        return privacy.row_losses(cfg, examples, m.model, m.tokenizer)

    a = calibrated(losses(members, final), losses(members, base))
    b = calibrated(losses(never, final), losses(never, base))
    r = loss_threshold_attack(a, b)
    mean = privacy.mean_seen

    print(f"{args.cell}: client 0 holds {len(kept)} rows, {drawn} drawn; {n} drawn against {n} never drawn")
    print(f"mean loss drop against the base model: drawn {mean(a):+.4f}, never drawn {mean(b):+.4f} nats")
    print(f"calibrated attack AUC {r.describe()}, best advantage {r.advantage:.3f}")


if __name__ == "__main__":
    main()
