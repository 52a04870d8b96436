"""Does the detector beat its teacher (discovery) on objects it never saw?

For each variant, `mirage run -S ...` in one copy of the project (the
committed toy models, dvc.yaml, params.yaml; a fresh DVC repo), then the
evaluate stage's side-by-side metrics: on the in-distribution test split and
on the ood split (shapes, textures and object counts no model was trained
on), TokenCut's and MaskCut's CorLoc and AP50, and the detector's AP50 per
round.  The teacher is the discovery method the detector was trained on.

Variants that import images get `--unlabeled` images of the ood world drawn
with another seed than the ood split's (so no evaluation image is trained
on), written as PNG files and imported through `sources.images` like a
user's own folder: transductive self-training on the new domain, the CutLER
recipe.  Item-level reuse makes later variants cheaper (the copy keeps its
tables between variants).

    .venv/bin/python benchmarks/ood_teacher.py                 # every variant, ~30 min on 2 cores
    .venv/bin/python benchmarks/ood_teacher.py --variants generated,imported
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mirage.data.params import load  # noqa: E402

# name -> (what it tries, -S overrides); sources.images is filled in for "imported" variants
VARIANTS: dict[str, tuple[str, dict]] = {
    "generated": ("the defaults: generated images only, TokenCut pseudo-boxes", {}),
    "maskcut": ("generated images only, MaskCut pseudo-boxes (several per image)", {"discover.method": "maskcut"}),
    "imported": ("generated + imported ood images, MaskCut on both, self-training on both (transductive)",
                 {"discover.method": "maskcut", "discover.imported_method": None, "sources.images": ["unlabeled"]}),
    "imported-split": ("generated + imported ood images, TokenCut on generated, MaskCut on imported",
                       {"discover.method": "tokencut", "discover.imported_method": "maskcut",
                        "sources.images": ["unlabeled"]}),
    "imported-split-jitter": ("as imported-split, with scale jitter, copy-paste and two self-training rounds",
                              {"discover.method": "tokencut", "discover.imported_method": "maskcut",
                               "sources.images": ["unlabeled"], "train_detector.scale_jitter": [0.75, 1.25],
                               "train_detector.copy_paste": 0.5, "train_detector.self_train_scores": [0.7, 0.7]}),
}


def make_copy(work: Path) -> Path:
    """The project's pipeline in `work` (stage code, models, params), DVC-initialised;
    a copy made before gets the checkout's code again and keeps its tables."""
    project = work / "project"
    fresh = not project.exists()
    project.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "dvc.yaml", project)
    shutil.copy(ROOT / "params.yaml", project)
    for pkg in ("flows", "tasks", "mirage", "models/generator", "models/encoder"):
        shutil.rmtree(project / pkg, ignore_errors=True)
        shutil.copytree(ROOT / pkg, project / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    if fresh:
        if (ROOT / "data").is_dir():  # the checkout's tables: items of the same params are reused, not recomputed
            shutil.copytree(ROOT / "data", project / "data", ignore=shutil.ignore_patterns(".*"))
        subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=project, check=True)
    return project


def write_unlabeled(project: Path, n: int, seed: int) -> Path:
    """`n` ood scenes (another seed than the ood split's) as PNG files: a user's unlabeled folder."""
    from PIL import Image

    from tasks.toyworld import render_scene

    folder = project / "unlabeled"
    if folder.exists() and len(list(folder.glob("*.png"))) == n:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    world = load(project / "params.yaml").toyworld
    if world.ood is None:
        raise SystemExit("params.yaml has no toyworld.ood split")
    split = world.ood.model_copy(update={"seed": seed})
    if seed == world.ood.seed:
        raise SystemExit(f"--seed {seed} is the ood split's own: evaluation images would be trained on")
    for i in range(n):
        Image.fromarray(render_scene(world, split, i).image).save(folder / f"scene-{i:05d}.png")
    return folder


def run_variant(project: Path, overrides: dict, log: Path) -> tuple[dict, float]:
    args = [str(Path(sys.executable).parent / "mirage"), "run"]
    for key, value in overrides.items():
        args += ["-S", f"{key}={json.dumps(value)}"]
    start = time.perf_counter()
    with open(log, "w") as out:
        rc = subprocess.run(args, cwd=project, stdout=out, stderr=subprocess.STDOUT,
                            env={**os.environ, "PREFECT_LOGGING_LEVEL": "WARNING"}).returncode
    if rc:
        raise SystemExit(f"mirage run failed (exit {rc}): see {log}")
    return json.loads((project / "metrics" / "evaluate.json").read_text()), time.perf_counter() - start


def report(name: str, why: str, overrides: dict, full: dict, m: dict, seconds: float) -> dict:
    teacher = full["discover.imported_method"] if full["sources.images"] and full["discover.imported_method"] \
        else full["discover.method"]  # what labelled the ood-like images, when any were imported
    print(f"\n== {name}: {why} ({seconds:.0f} s)")
    print(f"   -S {' -S '.join(f'{k}={json.dumps(v)}' for k, v in overrides.items()) or '(none)'}")
    print(f"   {'split':<6} {'TokenCut CorLoc/AP50':>21} {'MaskCut CorLoc/AP50':>20}   detector AP50 (AP) by round")
    out = {}
    for split, s in m["splits"].items():
        d = s["discovery"]
        rounds = " -> ".join(f"{r['ap50']:.3f} ({r['ap']:.3f})" for r in s["detector"])
        print(f"   {split:<6} {d['tokencut']['corloc']:>11.3f} / {d['tokencut']['ap50']:.3f} "
              f"{d['maskcut']['corloc']:>10.3f} / {d['maskcut']['ap50']:.3f}   {rounds}")
        best = s["detector"][-1]["ap50"]
        out[split] = {"teacher_ap50": d[teacher]["ap50"], "maskcut_ap50": d["maskcut"]["ap50"], "detector_ap50": best}
    ood = out.get("ood")
    if ood:
        print(f"   ood: detector {ood['detector_ap50']:.3f} vs its teacher ({teacher}) {ood['teacher_ap50']:.3f}, "
              f"vs MaskCut {ood['maskcut_ap50']:.3f}: "
              f"{'beats' if ood['detector_ap50'] >= ood['maskcut_ap50'] else 'below'} MaskCut; "
              f"in distribution {out['test']['detector_ap50']:.3f} (target >= 0.8)")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--unlabeled", type=int, default=300, help="ood images to import (unlabeled)")
    ap.add_argument("--seed", type=int, default=13, help="the unlabeled images' seed (not the ood split's)")
    ap.add_argument("--work", default="/tmp/mirage-ood-bench", help="the project copy (kept for reuse)")
    ap.add_argument("-S", dest="extra", action="append", default=[], help="KEY=VALUE for every variant (e.g. smaller settings)")
    args = ap.parse_args()
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown} (known: {', '.join(VARIANTS)})")
    extra = {}
    for item in args.extra:
        key, _, value = item.partition("=")
        extra[key] = json.loads(value) if value[:1] in "[{0123456789-tfn" else value
    work = Path(args.work)
    project = make_copy(work)
    write_unlabeled(project, args.unlabeled, args.seed)
    # what variants change, at the checkout's values: each variant starts from them
    tree = load(ROOT / "params.yaml").model_dump(mode="json")
    keys = {k for _, o in VARIANTS.values() for k in o}
    defaults = {k: tree[k.split(".")[0]][k.split(".")[1]] for k in sorted(keys)}
    results = {}
    for name in names:
        why, overrides = VARIANTS[name]
        full = {**defaults, **extra, **overrides}
        m, seconds = run_variant(project, full, work / f"{name}.log")
        results[name] = report(name, why, overrides, full, m, seconds)
    (work / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\nresults: {work / 'results.json'}")


if __name__ == "__main__":
    main()
