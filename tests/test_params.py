from pathlib import Path

import pytest

from mirage.data import params

ROOT = Path(__file__).resolve().parents[1]


def test_project_params_load():
    p = params.load(ROOT / "params.yaml")
    assert p.discover.tau == 0.8
    assert p.generate.classes == p.toyworld.classes


def test_unknown_key_is_named(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text((ROOT / "params.yaml").read_text().replace("tau:", "tua:"))
    with pytest.raises(params.ParamsError, match=r"discover\.tua"):
        params.load(bad)


def test_bad_value_is_named():
    with pytest.raises(params.ParamsError, match=r"generate\.per_prompt"):
        params.load(ROOT / "params.yaml", {"generate.per_prompt": 0})
    with pytest.raises(params.ParamsError, match=r"unknown parameter 'generate\.nope'"):
        params.load(ROOT / "params.yaml", {"generate.nope": 1})


def test_override_parsing():
    assert params.parse_override("discover.tau=0.3") == ("discover.tau", 0.3)
    assert params.parse_override("toyworld.classes=[circle, square]") == ("toyworld.classes", ["circle", "square"])
    with pytest.raises(params.ParamsError):
        params.parse_override("no-equals-sign")


def test_write_overrides_keeps_comments_and_validates(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text((ROOT / "params.yaml").read_text())
    params.write_overrides(path, {"discover.tau": 0.35})
    text = path.read_text()
    assert "affinity threshold on cosine similarity" in text
    assert params.load(path).discover.tau == 0.35
    with pytest.raises(params.ParamsError):
        params.write_overrides(path, {"discover.tau": 7})
    assert params.load(path).discover.tau == 0.35  # a rejected override changes nothing


def test_features_workers_is_a_count_or_auto():
    assert params.load(ROOT / "params.yaml").features.workers == "auto"
    assert params.load(ROOT / "params.yaml", {"features.workers": 3}).features.workers == 3
    with pytest.raises(params.ParamsError, match="features"):
        params.load(ROOT / "params.yaml", {"features.workers": -1})
    with pytest.raises(params.ParamsError, match="features.workers"):
        params.load(ROOT / "params.yaml", {"features.workers": "many"})


@pytest.mark.parametrize("key, value, line", [
    ("toyworld.ood.n", 7, "  ood: {n: 7, seed: 3, min_objects: 2, max_objects: 4, shapes: [diamond, cross, ring], "
                          "textures: [stripes, checker, dots]}"),  # a long flow mapping, not folded
    ("generate.model", "/a/long/path/" + "x" * 90, "  model: /a/long/path/" + "x" * 90),
    ("sources.images", ["a", "b c"], "  images: [a, b c]"),
    ("train_detector.mix", {"generated": 0.5, "imported": 1.0}, "  mix: {generated: 0.5, imported: 1.0}"),
    ("toyworld.unlabeled", None, "  unlabeled: null"),
])
def test_an_override_changes_its_own_line_and_no_other(tmp_path, key, value, line):
    """`-S` rewrites the one line of the key it sets (its comment kept); every
    other line of params.yaml stays byte-identical, none added or folded."""
    path = tmp_path / "params.yaml"
    path.write_bytes((ROOT / "params.yaml").read_bytes())
    before = path.read_text().splitlines(keepends=True)
    params.write_overrides(path, {key: value})
    after = path.read_text().splitlines(keepends=True)
    assert len(after) == len(before)
    changed = [i for i, (a, b) in enumerate(zip(before, after)) if a != b]
    assert len(changed) == 1, [(before[i], after[i]) for i in changed]
    old, new = before[changed[0]], after[changed[0]]
    assert new.split("#")[0].rstrip() == line
    assert ("#" in old) == ("#" in new) and old[old.find("#"):] == new[new.find("#"):]  # the comment as it was
    assert params.load(path).model_dump() == params.load(ROOT / "params.yaml", {key: value}).model_dump()
