"""Pictures and words the dashboard shows, computed without a server."""
from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

from mirage.run import report


def test_the_lineage_keeps_the_edges_no_other_path_implies():
    edges = {("toyworld", "import"), ("import", "features"), ("generate", "features"), ("features", "evaluate"),
             ("toyworld", "evaluate"), ("generate", "evaluate"), ("train_encoder", "features")}
    assert report.transitive_reduction(edges) == {("toyworld", "import"), ("import", "features"),
                                                  ("generate", "features"), ("features", "evaluate"),
                                                  ("train_encoder", "features")}
    assert report.transitive_reduction({("a", "b")}) == {("a", "b")}


def test_the_lineage_picture_has_a_box_per_stage_by_depth(monkeypatch):
    nodes = {"toyworld": ["data/toyworld: 112 rows, 0.27 MB"], "generate": ["data/generated: 24 rows, 0.06 MB"],
             "features": ["data/features: 24 rows, 1.36 MB"], "evaluate": ["metrics/evaluate.json: 0.00 MB"]}
    edges = {("toyworld", "evaluate"), ("generate", "features"), ("features", "evaluate")}
    monkeypatch.setattr(report, "lineage_graph", lambda root: (nodes, edges))
    img = Image.open(io.BytesIO(report.lineage_png(Path("."))))
    # rows: {toyworld, generate}, features, evaluate — two boxes side by side at most, three rows
    assert 600 <= img.width <= 700 and 250 <= img.height <= 400
    pixels = img.convert("RGB")
    fill = (238, 242, 255)  # a box's fill, seen at every box's place
    column = [pixels.getpixel((img.width // 2, y)) == fill for y in range(img.height)]
    runs = sum(1 for a, b in zip([False] + column, column) if b and not a)
    assert runs >= 2  # features and evaluate down the middle (toyworld and generate sit left and right of it)


def entry(run: str, params: str, commit: str, corloc: float, ap50: float, seconds: float) -> dict:
    return {"time": f"2026-12-01T10:0{run[-1]}:00", "flow_run": run, "params": params, "commit": commit,
            "metrics": {"discovery CorLoc": corloc, "test: detector AP50": ap50},
            "stages": {"evaluate": seconds}}


def test_a_drop_is_measured_against_the_last_run_with_the_same_params():
    from mirage.run.trends import drops

    runs = [entry("run1", "p1", "c1", 0.80, 0.90, 10), entry("run2", "p2", "c1", 0.50, 0.20, 10),
            entry("run3", "p1", "c2", 0.79, 0.70, 11)]
    fell = drops(runs, 0.1)  # run3 against run1 (run2 had other params)
    assert [(d["metric"], d["old"], d["new"], d["compared_with"]) for d in fell] == [
        ("test: detector AP50", 0.90, 0.70, "run1")]
    assert drops(runs, {"discovery CorLoc": 0.005}) == [
        {"metric": "discovery CorLoc", "old": 0.80, "new": 0.79, "drop": 0.01, "max_drop": 0.005,
         "compared_with": "run1"}]
    assert drops(runs, None) == [] and drops(runs[:1], 0.0) == []
    assert len(drops(runs, 0.0)) == 2  # 0: any fall


def test_history_survives_a_torn_line_and_the_trends_picture_draws_every_run(tmp_path):
    from types import SimpleNamespace

    from mirage.run import trends

    metrics = {"discovery": {"corloc": 0.7}, "generation": {"prompt_alignment": 0.5},
               "splits": {"test": {"detector": [{"ap": 0.3, "ap50": 0.6}, {"ap": 0.4, "ap50": 0.8}]}}}
    results = [SimpleNamespace(name="evaluate", ran=True, seconds=3.14159), SimpleNamespace(name="toyworld", ran=False, seconds=0)]
    trends.record(tmp_path, "calm-otter", ["commit:abc", "params:p1"], results, metrics)
    with (tmp_path / trends.HISTORY).open("a") as out:
        out.write('{"time": "2026-12-01T1')  # a run killed while writing its line
    trends.record(tmp_path, "brave-owl", ["commit:abd", "params:p1"], results, metrics)
    runs = trends.history(tmp_path)
    assert [r["flow_run"] for r in runs] == ["calm-otter", "brave-owl"]
    assert runs[0]["metrics"] == {"discovery CorLoc": 0.7, "test: detector AP": 0.4, "test: detector AP50": 0.8,
                                  "prompt alignment": 0.5}
    assert runs[0]["stages"] == {"evaluate": 3.14} and runs[0]["commit"] == "abc"
    img = Image.open(io.BytesIO(trends.trends_png(runs + [entry("run3", "p2", "abd", 0.5, 0.6, 20)])))
    assert img.size == (900, 590)
    assert trends.trends_png([]) is None


def test_the_offline_plots_page_is_what_the_package_bundles_and_dvc_uses_it():
    """.dvc/plots/offline.html (committed) holds vega, vega-lite and
    vega-embed itself, no CDN; DVC's config points `dvc plots` at it."""
    from mirage.run import plots

    committed = (Path(__file__).resolve().parents[1] / plots.TEMPLATE).read_text()
    assert committed == plots.template_html()  # `python -m mirage.run.plots` rewrites it
    assert "{plot_divs}" in committed and "{scripts}" not in committed and "cdn.jsdelivr" not in committed
    assert "window.vegaEmbed=" in committed
    config = (Path(__file__).resolve().parents[1] / ".dvc" / "config").read_text()
    assert "html_template = plots/offline.html" in config


def test_the_pr_picture_draws_a_line_per_round(tmp_path):
    from mirage.run import plots

    for k, drop in ((0, 0.5), (1, 0.9)):
        rows = "\n".join(f"{r / 10:.2f},{1.0 if r / 10 < drop else 0.2:.4f}" for r in range(11))
        (tmp_path / f"round-{k}.csv").write_text("recall,precision\n" + rows + "\n")
    img = Image.open(io.BytesIO(plots.pr_png(tmp_path))).convert("RGB")
    assert img.size == (560, 420)
    colors = {img.getpixel((x, y)) for x in range(56, 396) for y in range(28, 368)}
    assert (31, 119, 180) in colors and (214, 39, 40) in colors  # round 0 and round 1
    assert plots.pr_png(tmp_path / "none") is None
