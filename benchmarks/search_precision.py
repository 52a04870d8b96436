"""How well `mirage search` finds what it is asked for, on the cached toy data.

For each class of params.yaml, the query "a {class}" over data/features: the
share of the top k images whose generating prompt was that class
(precision@k), against the share a random ranking would give.  Run after
`mirage run`:

    .venv/bin/python benchmarks/search_precision.py -k 10
"""
from __future__ import annotations

import argparse

import polars as pl

from _common import ROOT, project_params

from mirage.models.fingerprint import encoder_spec
from mirage.models.encoders import load_encoder
from mirage.search import search, shard_files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", type=int, default=10)
    args = parser.parse_args()
    p = project_params()
    encoder = load_encoder(encoder_spec(str(ROOT / p.features.encoder)))
    images = ROOT / "data" / "generated"
    classes = dict(pl.scan_parquet(shard_files(images)).select("id", "class_name").collect().iter_rows())
    total = []
    for name in p.generate.classes:
        hits = search(f"a {name}", ROOT / "data" / "features", images, encoder, args.k)
        precision = sum(classes[h.id] == name for h in hits) / len(hits)
        chance = sum(c == name for c in classes.values()) / len(classes)
        total.append(precision)
        print(f"'a {name}': precision@{args.k} {precision:.2f}  (random ranking {chance:.2f})")
    print(f"mean precision@{args.k} = {sum(total) / len(total):.3f}")


if __name__ == "__main__":
    main()
