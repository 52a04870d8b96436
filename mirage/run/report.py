"""What a pipeline run shows on the Prefect dashboard, and who hears of a failure.

- tags: the git commit, the params digest and the profile, so a dashboard run
  maps to one experiment;
- assets: every DVC output as a Prefect asset (`prefect.assets`) with the
  outputs it was made from as upstream assets (the UI draws the lineage), with
  rows, bytes, DVC's hash and the stage's params digest as metadata;
- artifacts: a markdown summary (stages run or up to date and why, seconds,
  key metrics next to the previous run's), a metrics table per stage and
  self-training round, and pictures as `data:` URLs, which Prefect 3.8's UI
  renders in the page (no file server), the lineage among them (drawn here:
  both the classic and the V2 UI show it);
- alerts: a failed run posts its stage and cause to `alerts.webhook`.

Everything here reads the project's files after the fact; no stage depends on it.
"""
from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path
from typing import Any

from mirage.data import params as params_mod

SUMMARY_KEY = "mirage-summary"
METRICS_KEY = "mirage-metrics"
SHEET_KEY = "mirage-discoveries"
DETECTIONS_KEY = "mirage-detections"
LINEAGE_KEY = "mirage-lineage"
TRENDS_KEY = "mirage-trends"
PR_KEY = "mirage-pr"
QUALITY_KEY = "mirage-quality"
DUPLICATES_KEY = "mirage-duplicates"
CONCEPTS_KEY = "mirage-concepts"
TOY_MODELS = {"generate.model": "models/generator", "features.encoder": "models/encoder"}


# -- tags --------------------------------------------------------------------
def git_commit(root: Path) -> str | None:
    """HEAD's short hash, `+dirty` when tracked files differ from it; None outside git."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    head = git("rev-parse", "--short=10", "HEAD")
    if not head:
        return None
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return f"{head}+dirty" if dirty else head


def profile(params: params_mod.Params) -> str:
    """`toy` when both models are the project's own toy models, else `real`."""
    mine = params.generate.model == TOY_MODELS["generate.model"] and params.features.encoder == TOY_MODELS["features.encoder"]
    return "toy" if mine else "real"


def run_tags(root: Path, params: params_mod.Params) -> list[str]:
    return [f"commit:{git_commit(root) or 'none'}", f"params:{params.digest()[:12]}", f"profile:{profile(params)}"]


def tag_this_run(tags: list[str]) -> None:
    """Add tags to the flow run in progress (a served run's tags are the deployment's until then)."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    with get_client(sync_client=True) as client:
        client.update_flow_run(flow_run.id, tags=sorted(set(flow_run.tags) | set(tags)))


def save_experiment(root: Path, name: str) -> str | None:
    """Record the workspace as a DVC experiment named like the flow run, so
    `dvc exp show` and the dashboard name the same experiment; None outside a
    git repository (or when DVC cannot save it: the run itself stands)."""
    from dvc.repo import Repo

    if git_commit(root) is None:
        return None
    try:
        with Repo(str(root)) as repo:
            repo.experiments.save(name=name, force=True)
    except Exception as err:  # noqa: BLE001 - DVC raises many kinds; the run already succeeded
        from prefect import get_run_logger

        get_run_logger().warning("not saved as a DVC experiment: %s", err)
        return None
    return name


# -- assets ------------------------------------------------------------------
def asset_key(root: Path, path: str) -> str:
    return (root / path).resolve().as_uri()


def output_facts(path: Path) -> dict[str, Any]:
    """Rows (summed over the manifests of a table directory), bytes and files of one output."""
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path] if path.exists() else []
    facts: dict[str, Any] = {"bytes": sum(p.stat().st_size for p in files), "files": len(files)}
    manifests = [p for p in files if p.name == "manifest.json"]
    if manifests:
        facts["rows"] = sum(s["rows"] for m in manifests for s in json.loads(m.read_text())["shards"])
    return facts


def section_digest(params: params_mod.Params, keys: list[str]) -> str:
    """A short hash of the params.yaml keys a stage depends on (as dvc.yaml lists them)."""
    import hashlib

    tree = params.model_dump(mode="json")
    picked = {}
    for key in keys:
        node = tree
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        picked[key] = node
    return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:16]


def record_assets(root: Path, stage, producers: dict[str, str], params: params_mod.Params) -> None:
    """Materialize `stage`'s DVC outputs as Prefect assets, its upstream
    outputs (deps another stage writes) as their asset deps."""
    from prefect.assets import Asset, AssetProperties, add_asset_metadata, materialize
    from prefect.context import TagsContext

    outs = [o for o in stage.outs]
    if not outs:
        return
    param_keys = [k for dep in stage.deps if hasattr(dep, "params") for k in dep.params]
    digest = section_digest(params, param_keys)
    assets = [Asset(key=asset_key(root, o.def_path),
                    properties=AssetProperties(name=o.def_path, description=f"output of DVC stage `{stage.name}`"))
              for o in outs]
    upstream = [asset_key(root, d.def_path) for d in stage.deps if producer(d.def_path, producers)]

    def add_metadata() -> None:
        for out, asset in zip(outs, assets):
            hashed = out.hash_info.value if out.hash_info else None
            add_asset_metadata(asset, {"stage": stage.name, "params_digest": digest, "dvc_hash": hashed,
                                       **output_facts(root / out.def_path)})

    # without the run's tags: a tagged task run first takes a slot of each tag's concurrency limit from the
    # server (none is set for these tags), a round trip per stage for nothing
    with TagsContext(current_tags=set()):
        materialize(*assets, asset_deps=upstream, by="dvc", name=f"{stage.name}-outputs")(add_metadata)()


def producer(path: str, producers: dict[str, str]) -> str | None:
    """The stage whose output is `path` or holds it (data/toyworld/train is in data/toyworld)."""
    for out, stage in producers.items():
        if path == out or path.startswith(out.rstrip("/") + "/"):
            return stage
    return None


def lineage_graph(root: Path) -> tuple[dict[str, list[str]], set[tuple[str, str]]]:
    """Each stage's outputs in words (rows and size), and the edges (made
    from -> stage) between stages."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        stages = [s for s in repo.index.stages if s.cmd]
        producers = {o.def_path: s.name for s in stages for o in s.outs}
        nodes = {}
        for s in stages:
            outs = []
            for o in s.outs:
                facts = output_facts(root / o.def_path)
                rows = f"{facts['rows']} rows, " if "rows" in facts else ""
                outs.append(f"{o.def_path}: {rows}{facts['bytes'] / 1e6:.2f} MB")
            nodes[s.name] = outs
        edges = {(a, s.name) for s in stages for d in s.deps
                 if (a := producer(d.def_path, producers)) and a != s.name}
    return nodes, edges


def transitive_reduction(edges: set[tuple[str, str]]) -> set[tuple[str, str]]:
    """The edges a -> b with no other path from a to b (a DAG's): what every
    input comes through stays readable; what is read directly too is implied."""
    after: dict[str, set[str]] = {}
    for a, b in edges:
        after.setdefault(a, set()).add(b)

    def longer_path(a: str, b: str) -> bool:
        """Whether b is reached from a other than by the edge a -> b itself."""
        seen, todo = set(), [n for n in after.get(a, ()) if n != b]
        while todo:
            node = todo.pop()
            if node == b:
                return True
            if node not in seen:
                seen.add(node)
                todo += after.get(node, ())
        return False

    return {(a, b) for a, b in edges if not longer_path(a, b)}


def lineage_png(root: Path) -> bytes:
    """The lineage as a picture (rendered here, so every UI shows it the
    same): stages top to bottom by how far they are from the sources, each a
    box with its outputs, an arrow from each stage it was made from (an
    input that also reaches it through another stage is left implied)."""
    import io

    from PIL import Image, ImageDraw, ImageFont

    nodes, edges = lineage_graph(root)
    edges = transitive_reduction(edges)
    depth: dict[str, int] = {}

    def level(name: str) -> int:
        if name not in depth:
            depth[name] = 1 + max((level(a) for a, b in edges if b == name), default=-1)
        return depth[name]

    rows: dict[int, list[str]] = {}
    for name in nodes:  # dvc.yaml's order within a row
        rows.setdefault(level(name), []).append(name)
    bold, font = ImageFont.load_default(size=15), ImageFont.load_default(size=12)
    box_w, line_h, gap_x, gap_y, pad, lane = 290, 16, 24, 44, 8, 10
    skips = sorted((a, b) for a, b in edges if depth[b] - depth[a] > 1)  # routed around the rows between
    box_h = {n: pad * 2 + 18 + line_h * len(outs) for n, outs in nodes.items()}
    row_h = {r: max(box_h[n] for n in names) for r, names in rows.items()}
    margin = gap_x + lane * (len(skips) + 1)  # a lane each for the edges that skip a row, beside the boxes
    width = max(len(names) for names in rows.values()) * (box_w + gap_x) - gap_x + 2 * margin
    height = sum(row_h.values()) + gap_y * (len(rows) + 1)
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    where: dict[str, tuple[int, int, int, int]] = {}
    y = gap_y
    for r in sorted(rows):
        names = rows[r]
        x = (width - len(names) * (box_w + gap_x) + gap_x) // 2
        for name in names:
            where[name] = (x, y, x + box_w, y + box_h[name])
            x += box_w + gap_x
        y += row_h[r] + gap_y

    def ports(name: str, side: str) -> dict[str, int]:
        """Where each edge meets the box: spread along its bottom (out) or top (in), by the far end's x."""
        x0, _, x1, _ = where[name]
        others = sorted((b if side == "out" else a for a, b in edges if (a if side == "out" else b) == name),
                        key=lambda o: (where[o][0], o))
        return {o: x0 + (x1 - x0) * (i + 1) // (len(others) + 1) for i, o in enumerate(others)}

    outs, ins = {n: ports(n, "out") for n in nodes}, {n: ports(n, "in") for n in nodes}
    color = (120, 120, 140)
    for a, b in sorted(edges):
        start, end = (outs[a][b], where[a][3]), (ins[b][a], where[b][1])
        if (a, b) in skips:  # down, out to a lane beside the boxes, along it, back in above the target
            i = skips.index((a, b))
            left = start[0] < width // 2
            x_lane = (margin - lane * (i + 1)) if left else (width - margin + lane * (i + 1))
            below, above = start[1] + gap_y // 2 - 4 + i % 3 * 3, end[1] - gap_y // 2 + 4 - i % 3 * 3
            path = [start, (start[0], below), (x_lane, below), (x_lane, above), (end[0], above), end]
        else:
            path = [start, end]
        draw.line(path, fill=color, width=2, joint="curve")
        (px, py), (ex, ey) = path[-2], end
        norm = max(((ex - px) ** 2 + (ey - py) ** 2) ** 0.5, 1e-9)
        ux, uy = (ex - px) / norm, (ey - py) / norm
        draw.polygon([end, (ex - 9 * ux + 4 * uy, ey - 9 * uy - 4 * ux), (ex - 9 * ux - 4 * uy, ey - 9 * uy + 4 * ux)],
                     fill=color)
    for name, (x0, y0, x1, y1) in where.items():
        draw.rounded_rectangle((x0, y0, x1, y1), radius=6, fill=(238, 242, 255), outline=(70, 90, 160), width=2)
        draw.text((x0 + pad, y0 + pad), name, fill=(20, 30, 80), font=bold)
        for i, out in enumerate(nodes[name]):
            draw.text((x0 + pad, y0 + pad + 20 + i * line_h), out, fill=(40, 40, 40), font=font)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


# -- artifacts ---------------------------------------------------------------
def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def read_metrics(root: Path) -> dict | None:
    path = root / "metrics" / "evaluate.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def key_metrics(m: dict | None) -> dict[str, float | None]:
    if not m:
        return {}
    rounds = m["detector"]["rounds"]
    out = {"discovery CorLoc": m["discovery"]["corloc"],
           "discovery CorLoc, random weights": m["discovery"]["corloc_random_weights"]}
    out |= {"detector AP (last round)": rounds[-1]["ap"], "prompt alignment": m["generation"]["prompt_alignment"]}
    quality = m["generation"].get("quality") or {}
    if "fd" in quality:  # generated vs real images at N (the floor: real vs real at the same N)
        where = f"generated vs {quality['reference']}, N {quality['n']}"
        out |= {f"{name} ({where})": quality[name] for name in ("fd", "kid", "precision", "recall", "density", "coverage")}
        out |= {f"{name}, real vs real floor": quality["floor"][name] for name in ("fd", "precision", "recall", "coverage")}
    concepts = m.get("concepts") or {}
    for condition in ("trained", "random", "shuffled") if "trained" in concepts else ():  # stage concepts' controls
        c = concepts[condition]
        out |= {f"concepts: best buddies, {condition}": c["best_buddies"],
                f"concepts: mean r of best buddies, {condition}": c["mean_corr"]}
        out |= {f"concepts: object concepts on {split}, {condition}": c[split]["object_concepts"]
                for split in ("test", "ood") if split in c}
        out |= {f"concepts: best object IoU on {split}, {condition}": c[split]["best_iou"]
                for split in ("test", "ood") if split in c}
    if "stability" in concepts:
        out["concepts: split-half Jaccard of best buddies"] = concepts["stability"]["jaccard"]
    if not m.get("splits"):  # metrics of an older run: the test split's rounds only
        out |= {f"detector AP50, round {r}": x["ap50"] for r, x in enumerate(rounds)}
    for name, split in sorted(m.get("splits", {}).items(), key=lambda kv: kv[0] != "test"):
        # the detector against discovery, its teacher, by every COCO measure (ood: objects no model saw)
        where = "" if name == "test" else f"{name}: "
        for measure in ("ap", "ap50", "ap75", "ar100"):
            label = measure.upper()
            out |= {f"{name}: {method} {label}": x.get(measure) for method, x in split["discovery"].items()}
            out |= {f"{where}detector {label}, round {r}": x.get(measure) for r, x in enumerate(split["detector"])}
    return out


def _fmt(x: Any) -> str:
    return "–" if x is None else f"{x:.3f}" if isinstance(x, float) else str(x)


def metrics_table(results: list, metrics: dict | None) -> list[dict[str, Any]]:
    """One row per stage (item counts) and per metric (self-training rounds included)."""
    rows = []
    for r in results:
        out = r.result if isinstance(r.result, dict) else {}
        counts = {k: out[k] for k in ("items", "computed", "reused") if k in out}
        rows.append({"stage": r.name, "metric": "items computed / total" if counts else "ran",
                     "value": f"{counts.get('computed')} / {counts.get('items')}" if counts else str(r.ran)})
        if out.get("failed"):
            rows.append({"stage": r.name, "metric": "items failed (errors.parquet)", "value": str(out["failed"])})
    rows += [{"stage": "evaluate", "metric": k, "value": _fmt(v)} for k, v in key_metrics(metrics).items()]
    return rows


def summary_markdown(results: list, seconds: float, metrics: dict | None, previous: dict | None,
                     tags: list[str]) -> str:
    lines = ["# mirage pipeline run", "",
             f"{sum(r.ran for r in results)} stage(s) ran, {sum(not r.ran for r in results)} up to date, "
             f"{seconds:.1f} s. Tags: {', '.join(f'`{t}`' for t in tags)}", "",
             "| stage | state | seconds | why (DVC) |", "|---|---|---|---|"]
    for r in results:
        state = "restored from run-cache" if r.restored else "ran" if r.ran else "up to date"
        out = r.result if isinstance(r.result, dict) else {}
        if r.ran and "items" in out:
            state += f" ({out['computed']} of {out['items']} items computed"
            state += f", {out['failed']} failed: its table's errors.parquet)" if out.get("failed") else ")"
        why = "; ".join(r.why).replace("|", "/") if r.why else ("forced" if r.ran else "")
        lines.append(f"| {r.name} | {state} | {r.seconds:.1f} | {why[:300]} |")
    now, before = key_metrics(metrics), key_metrics(previous)
    if now:
        lines += ["", "## Metrics (toy test split unless marked ood; class-agnostic)", "", "| metric | this run | previous run |",
                  "|---|---|---|"]
        lines += [f"| {k} | {_fmt(v)} | {_fmt(before.get(k))} |" for k, v in now.items()]
    return "\n".join(lines)


def discoveries_sheet(root: Path, n: int = 16) -> bytes | None:
    """Generated images with their discovered boxes (yellow), as one PNG."""
    import numpy as np

    from mirage.data.images import decode_png, draw_grid
    from mirage.data.store import read_table

    try:
        images = read_table(root / "data/generated", columns=["id", "image"]).slice(0, n).to_pylist()
        found = {r["image_id"]: [o["box"] for o in r["objects"]]
                 for r in read_table(root / "data/discovery", columns=["image_id", "objects"]).to_pylist()}
    except FileNotFoundError:
        return None
    if not images:
        return None
    arrays = np.stack([decode_png(r["image"]) for r in images])
    scale = max(1, 128 // arrays.shape[1])
    return draw_grid(arrays, [[]] * len(images), [found.get(r["id"], []) for r in images], [[]] * len(images),
                     scale=scale, cols=8)


def publish(root: Path, results: list, seconds: float, previous: dict | None, tags: list[str]) -> None:
    """The run's artifacts: summary, metrics table, pictures."""
    from prefect.artifacts import (
        create_image_artifact,
        create_markdown_artifact,
        create_table_artifact,
    )

    metrics = read_metrics(root)
    markdown = summary_markdown(results, seconds, metrics, previous, tags)
    sheet = discoveries_sheet(root)
    detections = root / "plots" / "detections.png"
    pictures = []
    if sheet:
        create_image_artifact(data_url(sheet), key=SHEET_KEY,
                              description="Generated images with the boxes discover found (yellow)")
        pictures.append(("Generated images, discovered boxes (yellow)", sheet))
    if detections.exists():
        png = detections.read_bytes()
        create_image_artifact(data_url(png), key=DETECTIONS_KEY,
                              description="Test images: ground truth (green), discovered (yellow), detector (red)")
        pictures.append(("Test images: ground truth (green), discovered (yellow), detector (red)", png))
    quality = root / "plots" / "quality.png"
    if quality.exists() and (metrics or {}).get("generation", {}).get("quality"):
        png = quality.read_bytes()
        create_image_artifact(data_url(png), key=QUALITY_KEY,
                              description="Generated vs real images: precision, recall, density, coverage per class")
        pictures.append(("Generated vs real images: precision, recall, density, coverage (grey: real vs real)", png))
    duplicates = root / "data" / "curated" / "duplicates.png"
    if duplicates.exists():  # written only when curate.enabled
        png = duplicates.read_bytes()
        create_image_artifact(data_url(png), key=DUPLICATES_KEY,
                              description="Stage curate: the largest duplicate groups (kept image first)")
        pictures.append(("Curate: the largest duplicate groups (kept image first, framed green)", png))
    concepts = root / "plots" / "concepts.png"
    if concepts.exists() and (metrics or {}).get("concepts"):
        png = concepts.read_bytes()
        create_image_artifact(data_url(png), key=CONCEPTS_KEY,
                              description="Stage concepts: generator and encoder units that fire together (z-maps)")
        pictures.append(("Concepts: a generator unit and its encoder best buddy on generated images (z-score)", png))
    for title, png in pictures:
        markdown += f"\n\n## {title}\n\n![{title}]({data_url(png)})"
    from mirage.run.plots import pr_png
    from mirage.run.trends import history, trends_png

    pr = pr_png(root / "plots" / "pr")
    if pr:
        create_image_artifact(data_url(pr), key=PR_KEY, description="Detector precision-recall per self-training round")
        markdown += f"\n\n## Detector precision-recall (IoU 0.5), each self-training round\n\n![pr curves]({data_url(pr)})"

    trend = trends_png(history(root))
    if trend:
        create_image_artifact(data_url(trend), key=TRENDS_KEY, description="Key metrics and stage seconds over the last runs")
        markdown += f"\n\n## Over the last runs (dashed: params or code changed)\n\n![trends]({data_url(trend)})"
    title = "Lineage: each stage's DVC outputs (Prefect assets), arrows from what they were made from"
    lineage = lineage_png(root)
    create_image_artifact(data_url(lineage), key=LINEAGE_KEY, description=title)
    markdown += f"\n\n## {title}\n\n![lineage]({data_url(lineage)})\n"
    create_table_artifact(metrics_table(results, metrics), key=METRICS_KEY, description="mirage metrics per stage and round")
    create_markdown_artifact(markdown, key=SUMMARY_KEY, description="mirage pipeline run")


# -- alerts ------------------------------------------------------------------
def alert(webhook: str | None, payload: dict[str, Any]) -> None:
    """POST the failure to the webhook (a Slack/Teams/any JSON endpoint)."""
    if not webhook:
        return
    import httpx

    httpx.post(webhook, json=payload, timeout=10.0).raise_for_status()
