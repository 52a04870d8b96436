"""Does stage curate pay?  The detector trained on the curated images vs a random subset of the same size vs all.

On a finished project's tables (data/generated, data/features, data/discovery;
best made with settings that give near-duplicates: high guidance, many images
per prompt), for two training sets:
- "as generated": every generated image;
- "zipf": a deliberately imbalanced mix, class i (of discover.classes) kept
  with probability 1/(i+1) (Zipf, s = 1), a seeded choice per image;
the detector is trained as stage train_detector does (round 0 and the
self-training rounds, generated images only), on: all of the set; the images
curate keeps (tasks/curate.py, the stage's own function: SemDeDup +
balanced sampling down to `--keep` of the set); a random subset of the same
size.  Printed: images, training seconds, AP50 and AP on the test and ood
splits (class-agnostic, last round).  Also: planted duplicates (copies of
`--planted` generated images with small pixel noise, embedded by the
project's encoder) and the precision and recall of curate's dedup on them (the pairs found that involve a
copy: the generated images' own near-duplicates are not judged).

    .venv/bin/python benchmarks/curate_pays.py --project /tmp/curexp/project
    .venv/bin/python benchmarks/curate_pays.py --project P --keep 0.5 --steps 200 --self-train-steps 100
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from detector_boxes import round_metrics, train_rounds  # noqa: E402

from mirage.data.images import decode_png  # noqa: E402
from mirage.data.params import load  # noqa: E402
from mirage.data.store import item_key, read_table, table_metadata  # noqa: E402
from mirage.models.encoders import load_encoder  # noqa: E402
from mirage.models.fingerprint import encoder_spec  # noqa: E402
from tasks.curate import curate  # noqa: E402
from tasks.evaluate import load_test_split  # noqa: E402
from tasks.quality import embeddings_by_id  # noqa: E402
from tasks.train_detector import pseudo_labelled  # noqa: E402


def seeded(ids: list[str], salt: str) -> list[str]:
    return sorted(ids, key=lambda i: item_key(salt, i))


def planted_duplicates(root: Path, params, n: int, noise: float) -> tuple[float, float, int, int]:
    """Copies of n generated images with Gaussian pixel noise (sigma `noise`),
    embedded with features.encoder beside the originals; curate's dedup:
    (precision, recall, found, planted) of the (copy, original) pairs."""
    rows = read_table(root / "data/generated", columns=["id", "image"]).to_pylist()
    ids, emb = embeddings_by_id(str(root / "data/features"), {r["id"] for r in rows})
    image = {r["id"]: r["image"] for r in rows}
    originals = seeded(ids, "planted")[:n]
    rng = np.random.default_rng(0)
    copies = np.stack([np.clip(decode_png(image[i]) + rng.normal(0, noise, decode_png(image[i]).shape), 0, 255)
                       for i in originals]).astype(np.uint8)
    fcfg = params.features
    encoder = load_encoder(encoder_spec(fcfg.encoder))
    with torch.inference_mode():
        copy_emb = encoder.forward(encoder.prepare(copies), None)[0].float().numpy()
    copy_ids = [f"copy-of-{i}" for i in originals]
    result = curate(params.curate.model_copy(update={"enabled": True}), ids + copy_ids, [None] * (len(ids) + n),
                    np.concatenate([emb, copy_emb]), "benchmark", None)
    truth = {frozenset((c, o)) for c, o in zip(copy_ids, originals)}
    # the pairs that involve a planted copy (the generated images' own near-duplicates are not judged here)
    found = [(r["id"], r["nearest_kept"]) for r in result.table.to_pylist()
             if r["reason"] == "duplicate" and (r["id"].startswith("copy-of-") or r["nearest_kept"].startswith("copy-of-"))]
    right = sum(frozenset(p) in truth for p in found)
    return right / max(len(found), 1), right / n, len(found), n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--project", required=True, help="a project after `dvc repro discover` or `mirage run`")
    ap.add_argument("--keep", type=float, default=0.5, help="curate's target: this share of each set (0: no target, "
                                                            "dedup only)")
    ap.add_argument("--seed", type=int, default=None, help="train_detector.seed (default: the project's)")
    ap.add_argument("--steps", type=int, default=None, help="round-0 steps (default: the project's train_detector.steps)")
    ap.add_argument("--self-train-steps", type=int, default=None)
    ap.add_argument("--planted", type=int, default=60, help="generated images to plant noisy copies of")
    ap.add_argument("--noise", type=float, default=3.0, help="pixel noise sigma of a planted copy (0-255 scale)")
    ap.add_argument("--sets", default="as generated,zipf")
    args = ap.parse_args()
    root = Path(args.project)
    params = load(root / "params.yaml")
    classes = list(params.discover.classes)
    base = params.train_detector.model_copy(update={
        k: v for k, v in (("steps", args.steps), ("self_train_steps", args.self_train_steps), ("seed", args.seed))
        if v is not None})
    cfg_curate = params.curate.model_copy(update={"enabled": True})

    p, r, found, n = planted_duplicates(root, params, args.planted, args.noise)
    print(f"planted duplicates: {n} copies (pixel noise sigma {args.noise}), {found} pairs with a copy found by curate "
          f"(dedup_eps {cfg_curate.dedup_eps}, clusters {list(cfg_curate.clusters)}): precision {p:.3f}, recall {r:.3f}",
          flush=True)

    gen = {x["id"]: x["class_name"] for x in read_table(root / "data/generated", columns=["id", "class_name"]).to_pylist()}
    ids, emb = embeddings_by_id(str(root / "data/features"), set(gen))
    model = table_metadata(root / "data/features")["model"]
    splits = {name: load_test_split(str(root / f"data/toyworld/{name}"), classes) for name in ("test", "ood")}
    sets = {"as generated": ids,
            "zipf": [i for i in ids if int(item_key("zipf", i)[:8], 16) / 16**8 < 1 / (classes.index(gen[i]) + 1)]}
    print(f"{len(ids)} generated images; train_detector steps {base.steps} + {list(base.self_train_scores)} x "
          f"{base.self_train_steps}", flush=True)
    for set_name in filter(None, args.sets.split(",")):
        members = sets[set_name]
        target = max(1, round(args.keep * len(members))) if args.keep else None
        index = {i: k for k, i in enumerate(ids)}
        cur = curate(cfg_curate.model_copy(update={"target": target}), members, [gen[i] for i in members],
                     emb[[index[i] for i in members]], model, None)
        kept = [x["id"] for x in cur.table.to_pylist() if x["kept"]]
        reasons = cur.table.column("reason").to_pylist()
        counts = {c: sum(gen[i] == c for i in members) for c in classes}
        print(f"set {set_name}: {len(members)} images {counts}; curate keeps {len(kept)} "
              f"({reasons.count('duplicate')} duplicates, {reasons.count('balance')} over quota): "
              f"{ {c: sum(gen[i] == c for i in kept) for c in classes} }", flush=True)
        variants = {"all": members, "curated": kept, "random subset": seeded(members, "random")[: len(kept)]}
        for name, chosen in variants.items():
            data, labelled, sources = pseudo_labelled(str(root / "data/generated"), str(root / "data/discovery"),
                                                      classes if base.class_aware else None, None,
                                                      base.drop_spanning, only=set(chosen))
            start = time.perf_counter()
            models = train_rounds(base, classes, data, labelled, sources)
            seconds = time.perf_counter() - start
            line = f"  {name:<14} {len(chosen):>4} images ({len(data)} with pseudo-boxes), trained {seconds:5.0f} s:"
            for split_name, split in splits.items():
                m = round_metrics(models, split, params.evaluate.score_thresh)["rounds"][-1]
                line += f"  {split_name} AP50 {m['ap50']:.3f} AP {m['ap']:.3f}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
