"""Bad items are quarantined: corrupt or empty images, non-finite features,
images where discovery finds nothing go to the table's errors file, the run
finishes within errors.max_fraction and fails past it, and the next run tries
them again."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from conftest import ROOT

from mirage.data import params as params_mod
from mirage.data.store import (
    ShardStore,
    TooManyErrors,
    read_errors,
    read_table,
    table_metadata,
)

BROKEN = {3: b"\x89PNG\r\n\x1a\n not really a PNG", 7: b""}  # row -> image bytes


def copy_images(src: Path, dst: Path, broken: dict[int, bytes]) -> list[str]:
    """The images table at `src` written to `dst` with some rows' image bytes replaced; their ids."""
    table = read_table(src)
    rows = table.to_pylist()
    for i, data in broken.items():
        rows[i]["image"] = data
    meta = table_metadata(src)
    store = ShardStore(dst, table.schema.remove_metadata(), meta, shard_rows=1024)
    store.update([(r["key"], r) for r in rows], lambda rs: pa.Table.from_pylist(rs, schema=store.schema), batch_size=64)
    return [rows[i]["id"] for i in broken]


@pytest.fixture
def params(done):
    return params_mod.load(done / "params.yaml", {"generate.model": str(ROOT / "models" / "generator"),
                                                  "features.encoder": str(ROOT / "models" / "encoder")})


def features(p, images: Path, out: Path, max_fraction: float = 0.1) -> dict:
    from flows.features import features_flow

    errors = params_mod.Errors(max_fraction=max_fraction)
    return features_flow(p.features, str(images), p.generate.model, str(out), p.runner, errors)


def test_bad_images_are_listed_retried_and_fixed(done, params, tmp_path):
    bad_ids = copy_images(done / "data" / "generated", tmp_path / "images", BROKEN)
    n = read_table(done / "data" / "generated").num_rows
    first = features(params, tmp_path / "images", tmp_path / "features")
    assert (first["items"], first["computed"], first["failed"]) == (n, n - 2, 2)
    errors = read_errors(tmp_path / "features")
    assert [e["id"] for e in errors] == bad_ids and {e["stage"] for e in errors} == {"features"}
    assert "cannot be decoded" in errors[0]["reason"] and errors[1]["reason"] == "empty image (0 bytes)"
    assert read_table(tmp_path / "features").num_rows == n - 2
    again = features(params, tmp_path / "images", tmp_path / "features")
    assert (again["computed"], again["failed"]) == (0, 2)  # the bad items are tried again, nothing else
    shutil.rmtree(tmp_path / "images")
    copy_images(done / "data" / "generated", tmp_path / "images", {})  # the images fixed
    fixed = features(params, tmp_path / "images", tmp_path / "features")
    assert (fixed["computed"], fixed["failed"]) == (2, 0)
    assert read_errors(tmp_path / "features") == []
    assert read_table(tmp_path / "features").equals(read_table(done / "data" / "features"))


def test_past_max_fraction_the_stage_fails_with_a_summary(done, params, tmp_path):
    bad_ids = copy_images(done / "data" / "generated", tmp_path / "images", BROKEN)
    with pytest.raises(TooManyErrors, match=r"2 of \d+ items failed .*errors.max_fraction=0.05.*"
                                            + bad_ids[0] + ": cannot be decoded"):
        features(params, tmp_path / "images", tmp_path / "features", max_fraction=0.05)
    assert len(read_errors(tmp_path / "features")) == 2  # what worked is written and kept
    assert read_table(tmp_path / "features").num_rows == read_table(done / "data" / "generated").num_rows - 2


def test_non_finite_features_are_failed_items(done, params, tmp_path, monkeypatch):
    import tasks.features as stage

    real = stage.embed_batch

    def poisoned(*args, **kwargs):
        emb, patches = real(*args, **kwargs)
        emb[1] = np.nan  # the second image of every batch
        return emb, patches

    monkeypatch.setattr(stage, "embed_batch", poisoned)
    out = features(params, done / "data" / "generated", tmp_path / "features", max_fraction=0.5)
    batches = -(-out["items"] // params.features.batch_size)
    assert out["failed"] == batches
    assert {e["reason"] for e in read_errors(tmp_path / "features")} == {"non-finite features (NaN or inf)"}


def test_discovery_fails_images_without_an_object(done, params):
    from mirage.data.store import Partial
    from mirage.models.encoders import load_encoder
    from mirage.models.fingerprint import encoder_spec
    from tasks.discover import discover_batch

    meta = table_metadata(done / "data" / "features")
    grid = tuple(int(v) for v in meta["grid"].split(","))
    feats = read_table(done / "data" / "features", columns=["key", "id", "patches"]).to_pylist()[:4]
    images = {r["id"]: r for r in read_table(done / "data" / "generated", columns=["id", "image", "class_name"]).to_pylist()}
    rows = [{"key": f["key"], "id": f["id"], "patches": np.array(f["patches"], np.float16),
             "image": images[f["id"]]["image"], "class_name": images[f["id"]]["class_name"]} for f in feats]
    rows[1]["patches"] = np.full_like(rows[1]["patches"], np.nan)
    rows[3]["image"] = b"broken"
    encoder = load_encoder(encoder_spec(str(ROOT / "models" / "encoder")))
    out = discover_batch(encoder, params.discover, grid, rows)
    assert isinstance(out, Partial)
    assert out.table.column("key").to_pylist() == [rows[0]["key"], rows[2]["key"]]
    reasons = {k: why for k, (_, why) in out.errors.items()}
    assert set(reasons) == {rows[1]["key"], rows[3]["key"]}
    assert reasons[rows[1]["key"]].startswith("non-finite patch features")
    assert reasons[rows[3]["key"]].startswith("cannot be decoded")
    # MaskCut keeping only masks over 99% of the image: none is, so nothing is found
    strict = params.discover.model_copy(update={"method": "maskcut", "min_area": 0.99})
    none = discover_batch(encoder, strict, grid, rows[:1])
    assert none.table.num_rows == 0 and list(none.errors.values())[0][1].startswith("no object found")
