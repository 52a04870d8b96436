"""Dask runner vs local runner on the toy data, side by side in one run.

The toy images: the project's data/generated (300, after `mirage run`), or the
toy generate stage makes them; then,
interleaved, features and discover run on the local runner (batches in this
process, torch on every core) and on a Dask LocalCluster of 2 workers x 1
thread (`runner.kind: dask`), each writing a fresh table.  The cluster is
started once and kept warm (as a pipeline run shares it across its stages);
its start and the first, cold run are reported apart.  Outputs are compared
byte for byte.  Task overhead: a job that computes nothing, mapped over
`--noop-batches` batches, seconds of scheduling per batch.

    .venv/bin/python benchmarks/dask_runner.py --repeats 2
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from _common import prefect_server, project_params, timed


@dataclasses.dataclass(frozen=True)
class NoopJob:
    def load_key(self):
        return ("noop",)

    def load(self):
        return None

    def describe(self, _):
        return {}

    def prepare(self, _, batch):
        return batch

    def compute(self, _, batch):
        return batch


def digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-prompt", type=int, default=None, help="images per class (default: params.yaml's)")
    parser.add_argument("--features-batch", type=int, default=32,
                        help="features batch size (params.yaml: 128, 3 batches for 300 images: too few for 2 workers)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--noop-batches", type=int, default=64)
    parser.add_argument("--images", help="a generated images table (default: the project's data/generated after "
                                         "`mirage run`, else the toy generate stage makes one, ~2 min)")
    args = parser.parse_args()

    from flows.discover import discover_flow
    from flows.features import features_flow
    from flows.generate import generate_flow
    from mirage.run.runner import DaskRunner, shared_cluster
    from mirage.data.store import iter_rows

    p = project_params()
    root = Path(__file__).resolve().parents[1]
    gen = p.generate.model_copy(update={"model": str(root / p.generate.model),
                                        "per_prompt": args.per_prompt or p.generate.per_prompt})
    feats = p.features.model_copy(update={"encoder": str(root / p.features.encoder), "batch_size": args.features_batch})
    local = p.runner.model_copy(update={"kind": "local"})
    dask = p.runner.model_copy(update={"kind": "dask", "n_workers": 2, "threads_per_worker": 1})
    tmp = Path(tempfile.mkdtemp(prefix="mirage-bench-dask-"))
    try:
        with prefect_server():
            found = root / "data" / "generated" / "manifest.json"
            images = Path(args.images) if args.images else found.parent if found.exists() else tmp / "images"
            if not (images / "manifest.json").exists():
                seconds, _ = timed(generate_flow, gen, str(images), local)
                print(f"toy images: {gen.per_prompt * len(gen.classes)} generated in {seconds:.1f} s (local runner)")

            def stage(name: str, runner, out: Path):
                if name == "features":
                    return timed(features_flow, feats, str(images), gen.model, str(out / "features"), runner)
                return timed(discover_flow, p.discover, feats, str(images), str(out / "features"),
                             str(out / "objects"), str(out / "objects.coco.json"), runner)

            start = time.perf_counter()
            with shared_cluster(dask):
                started = time.perf_counter() - start
                cold = {}
                for name in ("features", "discover"):  # cold: workers import and load the models
                    cold[name], _ = stage(name, dask, tmp / "dask-cold")
                times = {(n, k): [] for n in ("features", "discover") for k in ("local", "dask")}
                same = {"features": True, "objects": True}
                for r in range(args.repeats):
                    for kind, runner in (("local", local), ("dask", dask)):
                        out = tmp / f"{kind}-{r}"
                        for name in ("features", "discover"):
                            seconds, result = stage(name, runner, out)
                            assert result["computed"] == result["items"], result
                            times[(name, kind)].append(seconds)
                    for part in same:
                        same[part] &= digest(tmp / f"local-{r}" / part) == digest(tmp / f"dask-{r}" / part)
                noop = {}
                for per_task in ("auto", 1):
                    with DaskRunner(dask.model_copy(update={"batches_per_task": per_task}), "noop") as runner:
                        batches = list(range(args.noop_batches))
                        list(runner.map(NoopJob(), batches[:4]))  # warm: the job's first load on each worker
                        noop[per_task], _ = timed(lambda: list(runner.map(NoopJob(), batches)))

        n = sum(1 for _ in iter_rows(images, ["key"]))
        print(f"\nDask LocalCluster 2 workers x 1 thread vs local runner, {n} toy images, median of {args.repeats} "
              f"interleaved repeats (warm cluster):")
        for name in ("features", "discover"):
            lo, da = statistics.median(times[(name, "local")]), statistics.median(times[(name, "dask")])
            print(f"  {name:<9} local {n / lo:7.1f} img/s ({lo:.1f} s)   dask {n / da:7.1f} img/s ({da:.1f} s)   "
                  f"throughput ratio dask/local {lo / da:.2f}   (cold first dask run {cold[name]:.1f} s)")
        print(f"  cluster start (2 worker processes): {started:.1f} s")
        print(f"  outputs byte-identical to the local runner's (features, discover): {same}")
        print(f"  task overhead: {noop['auto'] / args.noop_batches * 1000:.0f} ms of scheduling per batch "
              f"({args.noop_batches} empty batches in {noop['auto']:.2f} s on 2 workers, batches_per_task auto); "
              f"{noop[1] / args.noop_batches * 1000:.0f} ms per batch with one batch per task "
              f"({noop[1]:.2f} s)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
