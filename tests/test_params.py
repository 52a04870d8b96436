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
