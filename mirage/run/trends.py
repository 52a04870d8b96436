"""How a project's quality and stage times moved over its runs, and who hears of a drop.

Every pipeline run that ran a stage appends one line to
`.mirage/history.jsonl`: when, its flow run, params digest and commit (from
its tags), the key metrics and each stage's seconds.  `trends_png` draws the
last runs (one panel of metrics, one of stage times), with a dashed line
where the params or the code changed from the run before; `drops` compares a
run with the last earlier one of the same params digest, for
`alerts.max_drop`.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

HISTORY = Path(".mirage") / "history.jsonl"
SHOWN = 30  # runs drawn


def trend_metrics(m: dict | None) -> dict[str, float]:
    """The metrics followed over time (last self-training round's detector)."""
    if not m:
        return {}
    out = {"discovery CorLoc": m["discovery"]["corloc"]}
    for split in ("test", "ood"):
        rounds = m.get("splits", {}).get(split, {}).get("detector")
        if rounds:
            out[f"{split}: detector AP"] = rounds[-1]["ap"]
            out[f"{split}: detector AP50"] = rounds[-1]["ap50"]
    if m.get("generation", {}).get("prompt_alignment") is not None:
        out["prompt alignment"] = m["generation"]["prompt_alignment"]
    quality = m.get("generation", {}).get("quality") or {}
    out |= {f"generated {name}": quality[name] for name in ("precision", "recall", "coverage") if name in quality}
    return out


def _tag(tags: list[str], name: str) -> str | None:
    return next((t.split(":", 1)[1] for t in tags if t.startswith(f"{name}:")), None)


def record(root: Path, flow_run: str, tags: list[str], results: list, metrics: dict | None) -> dict[str, Any]:
    """Append this run to the project's history; returns its entry."""
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "flow_run": flow_run, "params": _tag(tags, "params"),
             "commit": _tag(tags, "commit"), "metrics": trend_metrics(metrics),
             "stages": {r.name: round(r.seconds, 2) for r in results if r.ran}}
    path = Path(root) / HISTORY
    path.parent.mkdir(parents=True, exist_ok=True)
    torn = path.exists() and path.stat().st_size and not path.read_bytes().endswith(b"\n")
    with path.open("a") as out:  # one line per run: a line a kill cut short is skipped when read
        out.write(("\n" if torn else "") + json.dumps(entry, sort_keys=True) + "\n")
    return entry


def history(root: Path, n: int | None = SHOWN) -> list[dict[str, Any]]:
    """The last `n` runs recorded, oldest first."""
    path = Path(root) / HISTORY
    if not path.exists():
        return []
    entries = []
    for line in path.read_text().splitlines():
        try:
            entries.append(json.loads(line))
        except ValueError:
            continue
    return entries[-n:] if n else entries


def drops(entries: list[dict[str, Any]], max_drop: float | dict[str, float] | None) -> list[dict[str, Any]]:
    """The last run's metrics that fell by more than `max_drop` (one number
    for all, or per metric) from the last earlier run with its params digest."""
    if max_drop is None or len(entries) < 2:
        return []
    now = entries[-1]
    before = next((e for e in reversed(entries[:-1]) if e.get("params") == now.get("params")), None)
    if before is None:
        return []
    out = []
    for metric, new in now["metrics"].items():
        limit = max_drop.get(metric) if isinstance(max_drop, dict) else max_drop
        old = before["metrics"].get(metric)
        if limit is not None and old is not None and new is not None and old - new > limit:
            out.append({"metric": metric, "old": old, "new": new, "drop": round(old - new, 6), "max_drop": limit,
                        "compared_with": before["flow_run"]})
    return out


def trends_png(entries: list[dict[str, Any]]) -> bytes | None:
    """The runs' metrics (top) and stage seconds (bottom), one line each,
    oldest left; a dashed line where params or code changed."""
    import io

    from PIL import Image, ImageDraw, ImageFont

    if not entries:
        return None
    font, small = ImageFont.load_default(size=13), ImageFont.load_default(size=11)
    palette = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75),
               (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
    width, left, right, panel_h, top = 900, 60, 230, 220, 30
    height = top + 2 * (panel_h + 60)
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    n = len(entries)
    plot_w = width - left - right

    def x_of(i: int) -> float:
        return left + (plot_w * i / (n - 1) if n > 1 else plot_w / 2)

    for i in range(1, n):  # what changed from the run before: a dashed line, labelled
        why = [w for w, k in (("params", "params"), ("code", "commit")) if entries[i].get(k) != entries[i - 1].get(k)]
        if why:
            x = x_of(i) - (x_of(i) - x_of(i - 1)) / 2
            for y in range(top, height - 40, 8):
                draw.line([(x, y), (x, y + 4)], fill=(170, 170, 170))
            draw.text((x + 2, top - 16), "+".join(why), fill=(110, 110, 110), font=small)

    def panel(y0: int, series: dict[str, list[float | None]], title: str, lo: float | None, hi: float | None,
              unit: str) -> None:
        values = [v for vs in series.values() for v in vs if v is not None]
        lo = min(values, default=0.0) if lo is None else lo
        hi = max(values, default=1.0) if hi is None else hi
        hi = hi if hi > lo else lo + 1.0
        draw.rectangle((left, y0, left + plot_w, y0 + panel_h), outline=(200, 200, 200))
        draw.text((left, y0 - 18), title, fill=(20, 20, 20), font=font)
        for k in range(5):
            v = lo + (hi - lo) * k / 4
            y = y0 + panel_h - panel_h * k / 4
            draw.line([(left - 4, y), (left, y)], fill=(120, 120, 120))
            draw.text((4, y - 7), f"{v:.2f}{unit}", fill=(90, 90, 90), font=small)
        for j, (name, vs) in enumerate(series.items()):
            color = palette[j % len(palette)]
            points = [(x_of(i), y0 + panel_h - panel_h * (v - lo) / (hi - lo)) for i, v in enumerate(vs) if v is not None]
            if len(points) > 1:
                draw.line(points, fill=color, width=2)
            for x, y in points:
                draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=color)
            last = next((v for v in reversed(vs) if v is not None), None)
            draw.text((left + plot_w + 10, y0 + 4 + 16 * j), f"{name}  {last:.3f}{unit}" if last is not None else name,
                      fill=color, font=small)

    names = list(dict.fromkeys(k for e in entries for k in e["metrics"]))
    panel(top + 20, {k: [e["metrics"].get(k) for e in entries] for k in names},
          f"metrics over the last {n} runs (right: the last run's)", 0.0, 1.0, "")
    stages = list(dict.fromkeys(k for e in entries for k in e["stages"]))
    panel(top + panel_h + 80, {k: [e["stages"].get(k) for e in entries] for k in stages},
          "stage seconds (a stage up to date in a run: no point)", 0.0, None, " s")
    draw.text((left, height - 24), f"{entries[0]['time']}  ({entries[0]['flow_run']})", fill=(90, 90, 90), font=small)
    label = f"{entries[-1]['time']}  ({entries[-1]['flow_run']})"
    draw.text((left + plot_w - draw.textlength(label, font=small), height - 24), label, fill=(90, 90, 90), font=small)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()
