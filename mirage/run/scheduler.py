"""Run the stale stages of dvc.yaml as one Prefect parent flow with a child flow per stage.

DVC decides staleness (`Repo.status`) and records what produced what
(`Repo.commit` writes dvc.lock exactly as `dvc repro` would); Prefect runs the
stages in-process, so one pipeline run pays for one Prefect client, and a run
with nothing stale never starts Prefect at all.  DVC's repo lock is held for
the whole run, so `mirage run` and `dvc repro` on one workspace serialise.
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from mirage.data import params as params_mod
from mirage.run import faults
from mirage.run.locks import (  # noqa: F401 - part of this module's API
    PipelineError,
    WorkspaceBusy,
    run_lock,
)


class _FrozenNotice(logging.Filter):
    """DVC's status warns about every frozen stage each time it is asked
    ("stage: 'train_generator' is frozen. Its dependencies are not going to
    be shown in the status output."): mirage asks on every run, a no-op
    included, and says what is frozen in `mirage status` and the summary."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "is frozen. Its dependencies are" not in str(record.msg)


logging.getLogger("dvc.repo.status").addFilter(_FrozenNotice())


@dataclass
class StageResult:
    name: str
    ran: bool
    seconds: float = 0.0
    why: list[str] = field(default_factory=list)
    result: object = None  # what the stage's flow returned: item counts, metrics
    restored: bool = False  # outputs checked out from DVC's run-cache instead of computed
    started: float = 0.0  # wall-clock time (time.time()) its computation began; it ended `seconds` later


def open_repo(root: Path):
    from dvc.repo import Repo

    _parse_yaml_once()
    return Repo(str(root))


_PARSED: dict[tuple[str, str], object] = {}  # (ruamel type, text) -> what DVC's parser made of it


def _parse_yaml_once() -> None:
    """DVC parses dvc.yaml, dvc.lock and params.yaml again for every status,
    commit and index (about 120 parses of the same few texts in one run, a
    tenth of a two-stage run's time): parse each text once per process and
    hand DVC a deep copy (ruamel's round-trip maps copy their comments and
    layout, so what DVC writes back is the same bytes)."""
    import copy

    from dvc.utils import serialize, strictyaml
    from dvc.utils.serialize import _yaml

    if getattr(_yaml.parse_yaml, "once", False):
        return
    parse = _yaml.parse_yaml

    def parse_yaml(text, path, typ="safe"):
        key = (typ, text)
        if key not in _PARSED:
            if len(_PARSED) >= 32:
                del _PARSED[next(iter(_PARSED))]
            _PARSED[key] = parse(text, path, typ)  # a parse error raises, and nothing is kept
        return copy.deepcopy(_PARSED[key])

    parse_yaml.once = True
    for module in (_yaml, serialize, strictyaml):  # each holds its own reference to the function
        module.parse_yaml = parse_yaml


def check_frozen_outputs(repo) -> None:
    """Frozen stages (the committed toy models) never run on their own; their
    outputs must be there, or nothing downstream can run."""
    for stage in repo.index.stages:
        if stage.frozen:
            for out in stage.outs:
                if not Path(out.fs_path).exists():
                    raise PipelineError(
                        f"{out.def_path} (the output of frozen stage {stage.name!r}) is missing: "
                        f"`mirage train {stage.name.removeprefix('train_')}` rebuilds it, `dvc pull` fetches it")


def stage_order(repo) -> list:
    """Stages in dvc.yaml order, checked to be a valid execution order."""
    stages = [s for s in repo.index.stages if s.cmd]
    graph = repo.index.graph  # edges: stage -> a stage it depends on
    seen = set()
    for stage in stages:
        for upstream in graph.successors(stage):
            if upstream.cmd and upstream not in seen:
                raise RuntimeError(f"dvc.yaml lists stage {stage.name!r} before {upstream.name!r}, which it depends on")
        seen.add(stage)
    return stages


def describe(status: dict) -> dict[str, list[str]]:
    """DVC's status dict -> stage name: its reasons in words."""
    return {target.split(":")[-1]: in_words(changes) for target, changes in status.items()}


def stale(root: Path) -> dict[str, list[str]]:
    """What `dvc status` says, by stage name, frozen stages left out: they
    never run by themselves (a changed committed model shows as a changed
    input of the stages that read it)."""
    with open_repo(root) as repo:
        return stale_in(repo)


def stale_in(repo) -> dict[str, list[str]]:
    """`stale()` on an open repo (one `dvc status` call), with the import
    stage when its files changed."""
    frozen = {s.name for s in repo.index.stages if s.frozen}
    why = {name: why for name, why in describe(repo.status()).items() if name not in frozen}
    for name, lines in source_changes(repo).items():
        why[name] = why.get(name, []) + lines
    return why


IMPORT = "import"  # the stage whose inputs are files outside DVC's view (sources.images)


def source_changes(repo, stage=None) -> dict[str, list[str]]:
    """{import: [why]} when the files of sources.images were added, changed or
    removed since the stage ran: DVC sees its params, not the files (a folder
    or glob outside the repo), so mirage compares a scan of names, sizes and
    times with the one the stage recorded."""
    from mirage.data.sources import sources_changed

    stage = stage or next((s for s in repo.index.stages if s.name == IMPORT), None)
    if stage is None or stage.name != IMPORT or not stage.outs:
        return {}
    root = Path(repo.root_dir)
    entries = params_mod.load(root / "params.yaml").sources.images
    if sources_changed(root, entries, stage.outs[0].fs_path, produced_paths(repo)):
        return {IMPORT: ["files of sources.images added, changed or removed since it ran"]}
    return {}


def produced_paths(repo) -> tuple[Path, ...]:
    """The outputs of every stage but import: where a sources.images entry may not exist yet."""
    return tuple(Path(o.fs_path) for s in repo.index.stages if s.name != IMPORT for o in s.outs)


def check_sources(root: Path, entries: tuple[str, ...]) -> None:
    """sources.images entries that name no file are refused (ParamsError)
    before params.yaml is written; those inside another stage's output are
    made by the run first (toyworld's unlabeled scenes)."""
    from mirage.data.sources import check_entries

    if not entries:
        return
    with open_repo(root) as repo:
        produced = produced_paths(repo)
    check_entries(Path(root), tuple(entries), produced)


def _flatten(value, prefix: str) -> dict[str, object]:
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out |= _flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    return {prefix: value}


def changed_params(stage, current: dict) -> list[str]:
    """`key: old -> new` for every parameter of `stage` that differs from what
    dvc.lock recorded when it last ran (dotted keys, leaves only)."""
    recorded, keys, lines = {}, [], []
    for dep in stage.deps:
        if getattr(dep, "def_path", "") == "params.yaml" and hasattr(dep, "params"):
            recorded |= dict(dep.hash_info.value or {}) if dep.hash_info else {}  # what dvc.lock holds
            keys += list(dep.params)
    for key in keys:
        node = current
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        old, new = _flatten(recorded.get(key), key), _flatten(node, key)
        for leaf in sorted(set(old) | set(new)):
            if old.get(leaf) != new.get(leaf):
                lines.append(f"{leaf}: {old.get(leaf, '(not set)')} -> {new.get(leaf, '(removed)')}")
    return lines


def in_words(changes: list, stage=None, current: dict | None = None) -> list[str]:
    """DVC's status entries of one stage as sentences: which code files, data
    and (given the stage and params.yaml's values) params by key changed."""
    words = []
    for change in changes:
        if isinstance(change, str):
            words.append(change)
            continue
        for kind, entries in change.items():
            if not isinstance(entries, dict):
                words.append(f"{kind}: {entries}")
                continue
            for path, state in entries.items():
                if path == "params.yaml":
                    keys = changed_params(stage, current) if stage is not None else []
                    words += [f"param {line}" for line in keys] or [f"params changed: {state}"]
                elif kind == "changed outs":
                    words.append(f"output {path}: {state}")
                elif path.endswith(".py") or path.startswith("mirage/models/model_configs"):
                    words.append(f"code {path}: {state}")
                else:
                    words.append(f"input {path}: {state}")
    return words


@dataclass
class Status:
    stale: dict[str, list[str]]  # stage -> why, in words
    downstream: list[str]  # stages that will run after them, their inputs changed
    frozen: dict[str, list[str]]  # frozen stage -> deps changed since it was trained


def explain(root: Path) -> Status:
    """What `mirage run` would do and why: DVC's status in words, with the
    changed parameter keys, and the stages downstream of the stale ones."""
    import networkx as nx
    import yaml
    from dvc.repo import lock_repo

    current = yaml.safe_load((root / "params.yaml").read_text()) or {}
    with open_repo(root) as repo, lock_repo(repo):
        stages = {s.name: s for s in stage_order(repo)}
        why = {}
        for name, stage in stages.items():
            changes = [] if stage.frozen else stage.status().get(stage.addressing, [])
            lines = (in_words(changes, stage, current) if changes else []) + source_changes(repo, stage).get(name, [])
            if lines:
                why[name] = lines
        frozen = {}
        for name, stage in stages.items():
            if stage.frozen and not any(out.hash_info for out in stage.outs):
                frozen[name] = ["not recorded in dvc.lock (committed outside DVC, or never trained here)"]
            elif stage.frozen:
                stage.frozen = False  # in memory only: what changed since the models were trained
                changes = stage.status().get(stage.addressing, [])
                stage.frozen = True
                if changes:
                    frozen[name] = in_words(changes, stage, current)
        graph = repo.index.graph  # edges point upstream
        later = set()
        for name in why:
            later |= {s.name for s in nx.ancestors(graph, stages[name]) if s.cmd}
        downstream = [n for n in stages if n in later and n not in why and not stages[n].frozen]
    return Status({n: why[n] for n in stages if n in why}, downstream, frozen)


def restore_from_run_cache(repo, stage) -> bool:
    """Check out a whole-output stage's outputs from DVC's run-cache when it
    already ran with these exact deps and params (what `dvc repro` does), e.g.
    after switching a model and back.  Item stages (`persist` outputs) never
    qualify: their stores reuse items instead."""
    from dvc.stage.cache import RunCacheNotFoundError

    try:
        repo.stage_cache.restore(stage)
    except RunCacheNotFoundError:
        return False
    return True


class StageFailed(RuntimeError):
    """A stage raised: the message names the stage, the items (where the store
    knew them) and the cause, and becomes the failed run's state message."""

    def __init__(self, stage: str, err: BaseException):
        notes = "; ".join(getattr(err, "__notes__", []))
        super().__init__(f"stage {stage} failed: {type(err).__name__}: {err}" + (f" ({notes})" if notes else ""))
        self.stage, self.cause = stage, f"{type(err).__name__}: {err}"


def busy(root) -> WorkspaceBusy:
    return WorkspaceBusy(f"another pipeline run or `dvc repro` is using {root} (DVC's lock .dvc/tmp/lock "
                         f"is held): this run did nothing, params.yaml is as it was; try again when it ends")


WAIT_FOR_DVC = 120.0  # s: a run that wrote params.yaml waits this long for a `dvc repro` beside it to end
WROTE_PARAMS: set[Path] = set()  # roots whose params.yaml this process's run in progress has written


def dvc_wait(root: Path) -> float:
    """How long a run waits for DVC's lock: once it wrote params.yaml it
    must not give up at the first try (a `dvc repro` started beside it is
    refused by the run lock and ends soon); before, it is refused at once,
    having touched nothing."""
    return WAIT_FOR_DVC if Path(root).resolve() in WROTE_PARAMS else 0.0


@contextlib.contextmanager
def workspace_lock(repo, wait: float = 0.0):
    """DVC's repo lock for the whole run: one pipeline run per workspace.
    Held by someone else (a `dvc repro` started beside this run: its stage
    commands are refused by mirage's run lock, so it ends soon), it is tried
    again for `wait` seconds, then WorkspaceBusy."""
    from dvc.lock import LockError
    from dvc.repo import lock_repo

    deadline = time.monotonic() + wait
    while True:
        try:
            cm = lock_repo(repo)
            cm.__enter__()
        except LockError:
            cm = None
        # DVC lets go of its repo lock while a stage command of `dvc repro` runs, and keeps that stage's
        # outputs locked (.dvc/tmp/rwlock): the workspace is busy until that ends too
        if cm is not None and not _stage_locks_held(repo):
            break
        if cm is not None:
            cm.__exit__(None, None, None)
        if time.monotonic() >= deadline:
            raise busy(repo.root_dir) from None
        time.sleep(0.5)
    try:
        yield
    finally:
        cm.__exit__(None, None, None)


@contextlib.contextmanager
def params_put_back_if_busy(root: Path):
    """A run refused for a busy workspace after it wrote its `-S` values puts
    params.yaml back as it was, so that "this run did nothing" is true."""
    path = Path(root) / "params.yaml"
    before = path.read_bytes()
    try:
        yield
    except BaseException as err:
        if _is_busy(err) and path.read_bytes() != before:
            from mirage.data.store import atomic_write_bytes

            atomic_write_bytes(path, before)
        raise
    finally:
        WROTE_PARAMS.discard(Path(root).resolve())


def _is_busy(err: BaseException | None) -> bool:
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, WorkspaceBusy) or type(err).__name__ == "LockError":
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False


def _stage_locks_held(repo) -> bool:
    """Whether a live process other than this one holds DVC's read or write
    lock on some path (`.dvc/tmp/rwlock`: a `dvc repro` stage running)."""
    import os

    import psutil

    try:
        locks = json.loads((Path(repo.tmp_dir) / "rwlock").read_text())
    except (OSError, ValueError):
        return False
    holders = [info for infos in locks.get("read", {}).values() for info in infos]
    holders += list(locks.get("write", {}).values())
    return any(int(h["pid"]) != os.getpid() and psutil.pid_exists(int(h["pid"])) for h in holders)


def check_dvc_free(root: Path) -> None:
    """WorkspaceBusy if `dvc repro` (or anything holding DVC's lock) runs here now."""
    with open_repo(root) as repo, workspace_lock(repo):
        pass


def upstream_stages(repo, stages: list) -> dict[str, set[str]]:
    """Stage name -> the names of the stages whose outputs it reads."""
    graph = repo.index.graph  # edges: stage -> a stage it depends on
    return {s.name: {u.name for u in graph.successors(s) if u.cmd} for s in stages}


def _timed_stage(run_stage, cmd: str) -> tuple[object, float, float]:
    """What the stage returned, when it started (wall clock) and its seconds."""
    started, start = time.time(), time.perf_counter()
    output = run_stage(cmd)
    return output, started, time.perf_counter() - start


@contextlib.contextmanager
def _stage_threads(n: int):
    """A pool of `n` threads for stages.  If the pipeline's thread is
    interrupted (a cancelled run's SIGTERM, Ctrl-C), the stages running in it
    stop at their next progress step (finished batches stay in their work
    areas) instead of running on to their end while the process waits."""
    from mirage.run.stage import STOP

    pool = ThreadPoolExecutor(n, thread_name_prefix="mirage-stage")
    try:
        yield pool
    except BaseException:
        STOP.set()
        raise
    finally:
        pool.shutdown(wait=True)
        STOP.clear()  # the stages have ended: the next run starts clean


def run_stages(root: Path, run_stage, force: bool = False, train: tuple[str, ...] = (), on_stage=None,
               params: params_mod.Params | None = None, load_stage=None) -> list[StageResult]:
    """Run every stale stage in this process, each recorded in dvc.lock as it
    finishes (`dvc commit`); `on_stage(repo, stage, result)` is called after
    each one that ran; `run_stage(cmd)` runs a dvc.yaml command in this
    process and `load_stage(cmd)` imports its code first (flows/pipeline.py
    gives both: this module never imports stage code).  Stale stages whose upstream stages are done start at
    once, up to `runner.parallel_stages` at a time, each in a thread; DVC's
    status, commits and run-cache stay in this thread, under DVC's repo lock,
    and stages are committed in dvc.yaml order, so dvc.lock ends exactly as a
    sequential run writes it.  With `params`, the configured models are
    checked first when something is to run (a no-op stays as cheap as `dvc
    status`).  Call inside a Prefect flow: each stage's flow is then its child
    flow run, and with `runner.kind: dask` they share one cluster."""
    import yaml
    from prefect import get_run_logger

    from mirage.models.checks import check_models
    from mirage.run.runner import shared_cluster

    log = get_run_logger()
    repo = open_repo(Path(root))
    with workspace_lock(repo, wait=dvc_wait(root)):
        order = stage_order(repo)
        if not force and not train and not stale_in(repo):
            return [StageResult(s.name, ran=False) for s in order]
        if params is not None:
            check_models(params)  # a model that cannot be loaded fails here, naming its key, before any stage
        runner = params.runner if params is not None else params_mod.Runner()
        current = yaml.safe_load((Path(root) / "params.yaml").read_text()) or {}
        upstream = upstream_stages(repo, order)
        for stage in order:  # imported here, once: stages side by side then start together, not an import apart
            if load_stage and (not stage.frozen or stage.name in train):
                load_stage(stage.cmd)
        results: dict[str, StageResult] = {}  # decided and, if it ran, committed
        finished: dict[str, StageResult] = {}  # ran, not yet committed
        done: set[str] = set()  # outputs final: downstream stages may start
        running: dict = {}  # future -> (stage, why)
        failures: list[StageFailed] = []

        def decide(stage) -> None:
            """Skip `stage`, restore it from the run-cache, or start it."""
            if stage.frozen and stage.name not in train:
                results[stage.name] = StageResult(stage.name, ran=False)
                done.add(stage.name)
                return
            why = [line for changes in repo.status(targets=[stage.addressing]).values()
                   for line in in_words(changes, stage, current)] + source_changes(repo, stage).get(stage.name, [])
            if not why and not force and stage.name not in train:
                results[stage.name] = StageResult(stage.name, ran=False)
                done.add(stage.name)
                return
            log.info("stage %s: running (%s)", stage.name, "; ".join(why or ["forced"])[:500])
            start = time.perf_counter()
            if not force and stage.name not in train and restore_from_run_cache(repo, stage):
                log.info("stage %s: restored from DVC's run-cache (ran before with these deps and params)", stage.name)
                finished[stage.name] = StageResult(stage.name, True, time.perf_counter() - start, why, None, True)
                done.add(stage.name)
                return
            # the child flow runs in a thread with this flow run's context, so it is a child flow run
            running[pool.submit(contextvars.copy_context().run, _timed_stage, run_stage, stage.cmd)] = (stage, why)

        def start_ready() -> None:
            progress = True
            while progress and not failures:
                progress = False
                for stage in order:
                    if len(running) >= runner.parallel_stages:
                        return
                    decided = stage.name in results or stage.name in finished or any(
                        s is stage for s, _ in running.values())
                    pinned = stage.frozen and stage.name not in train  # its outputs are final: nothing to wait for
                    if not decided and (pinned or upstream[stage.name] <= done):
                        decide(stage)
                        progress = True

        def commit(name: str) -> None:
            stage = next(s for s in order if s.name == name)
            result = finished.pop(name)
            repo.commit(stage.addressing, force=True)
            if not result.restored:
                repo.stage_cache.save(repo.stage.get_target(stage.addressing))  # a later switch back restores it
            repo._reset()  # re-read dvc.lock before the next stage's status
            results[name] = result
            if on_stage:
                on_stage(repo, repo.stage.get_target(stage.addressing), result)

        def commit_in_order() -> None:
            for stage in order:
                if stage.name in finished:
                    commit(stage.name)
                elif stage.name not in results:
                    return  # a stage before the rest is not decided yet: dvc.lock keeps dvc.yaml's order

        with shared_cluster(runner), _stage_threads(runner.parallel_stages) as pool:
            start_ready()
            while running:
                ended, _ = wait(list(running), return_when=FIRST_COMPLETED)
                for future in ended:
                    stage, why = running.pop(future)
                    try:
                        output, started, seconds = future.result()
                    except Exception as err:
                        failures.append(StageFailed(stage.name, err))
                        failures[-1].__cause__ = err
                        continue
                    finished[stage.name] = StageResult(stage.name, True, seconds, why, output, started=started)
                    done.add(stage.name)
                commit_in_order()
                start_ready()
        for name in [s.name for s in order if s.name in finished]:
            commit(name)  # after a failure: what finished is recorded, whatever the order
        if failures:
            raise failures[0]
    return [results[s.name] for s in order if s.name in results]


def prepare(root: Path, overrides: dict | None = None, train: tuple[str, ...] = ()) -> params_mod.Params:
    """Apply `-S` overrides to params.yaml and validate it; check the models
    when the overrides change it (before params.yaml does).  Run in the root."""
    from mirage.models.checks import check_models

    params = params_mod.load("params.yaml", overrides)  # bad values fail here, before any work
    if overrides and params != params_mod.load("params.yaml"):  # a scheduled run's overrides are set once
        check_models(params)  # and models that cannot be loaded, before params.yaml changes
        check_sources(root, params.sources.images)  # and entries naming no file
        check_dvc_free(root)  # `dvc repro` running here would record the new values as its own
        params_mod.write_overrides("params.yaml", overrides)
        WROTE_PARAMS.add(Path(root).resolve())  # from here on, DVC's lock is waited for, not given up on
        faults.point("params-written")  # tests: a `dvc repro` started from here on must not end this run
    with open_repo(root) as repo:
        frozen = {s.name for s in repo.index.stages if s.frozen}
        if set(train) - frozen:
            raise PipelineError(f"not a frozen training stage: {sorted(set(train) - frozen)} (frozen: {sorted(frozen)})")
        if not train:
            check_frozen_outputs(repo)
    return params


def summary(root: str | Path, results: list[StageResult], seconds: float) -> str:
    root = Path(root)
    ran = [r for r in results if r.ran]
    lines = [f"mirage: {len(ran)} stage(s) ran, {len(results) - len(ran)} up to date, {seconds:.1f} s"]
    for r in results:
        if not r.ran:
            lines.append(f"  {r.name:<15} up to date")
        elif r.restored:
            lines.append(f"  {r.name:<15} restored from DVC's run-cache in {r.seconds:.1f} s")
        else:
            counts = r.result if isinstance(r.result, dict) and "computed" in r.result else None
            detail = f" ({counts['computed']} of {counts['items']} items computed" if counts and "items" in counts else ""
            if detail:
                failed = counts.get("failed")
                kept = counts["items"] - counts["computed"] - (failed or 0)
                detail += f", {kept} kept" if kept > 0 else ""
                detail += f", {failed} failed: listed in {counts.get('errors')})" if failed else ")"
            lines.append(f"  {r.name:<15} ran {r.seconds:.1f} s{detail}")
    metrics = root / "metrics" / "evaluate.json"
    if metrics.exists():
        m = json.loads(metrics.read_text())
        lines += [
            "metrics (metrics/evaluate.json):",
            f"  discovery CorLoc      {m['discovery']['corloc']:.3f}  (same backbone with random weights "
            f"{m['discovery']['corloc_random_weights']:.3f}; {m['discovery']['backbone']})",
            f"  detector AP50 / AP    {m['detector']['ap50']:.3f} / {m['detector']['ap']:.3f}  (class-agnostic, toy test split)",
            "  AP50 by self-training round  " + " -> ".join(f"{r['ap50']:.3f}" for r in m["detector"]["rounds"]),
            f"  prompt alignment      {m['generation']['prompt_alignment'] or float('nan'):.3f}",
        ]
        q = m["generation"].get("quality") or {}
        if "fd" in q:
            f = q["floor"]
            lines.append(f"  generated vs real     FD {q['fd']:.4f} (floor {f['fd']:.4f}), precision / recall "
                         f"{q['precision']:.3f} / {q['recall']:.3f} (floor {f['precision']:.3f} / {f['recall']:.3f}), "
                         f"density / coverage {q['density']:.3f} / {q['coverage']:.3f}  (N {q['n']}, {q['reference']})")
        c = m.get("concepts") or {}
        if "trained" in c:  # stage concepts: trained vs its controls
            conds = [c[k] for k in ("trained", "random", "shuffled")]
            on_test = " / ".join(str(x.get("test", {}).get("object_concepts", "–")) for x in conds)
            lines.append(f"  concepts              best buddies {' / '.join(str(x['best_buddies']) for x in conds)}, "
                         f"object concepts on test {on_test}  (trained / random twins / shuffled; {c['images']} images, "
                         f"split-half Jaccard {c['stability']['jaccard']:.2f})")

        def coco(x: dict) -> str:
            return " / ".join(f"{x[k]:.3f}" if isinstance(x.get(k), float) else "–" for k in ("ap", "ap50", "ap75"))

        for name, split in sorted(m.get("splits", {}).items(), key=lambda kv: kv[0] != "test"):  # test, then ood
            lines.append(f"  {name} split ({split['images']} images), AP / AP50 / AP75:")
            lines += [f"    {k:<9} {coco(v)}  (CorLoc {v['corloc']:.3f})" for k, v in split["discovery"].items()]
            lines += [f"    detector round {r}  {coco(x)}" for r, x in enumerate(split["detector"])]
    lines.append("outputs: data/ (tables), models/ (weights), metrics/, plots/ — `dvc metrics show`, `dvc plots show`")
    return "\n".join(lines)
