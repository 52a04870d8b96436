"""Bring your own images: stage import, and discover / train_detector on any mix."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY
from PIL import Image

from mirage.data.images import decode_png
from mirage.data.params import ParamsError, Sources, load
from mirage.data.store import read_errors, read_table


def picture(h: int, w: int, seed: int) -> np.ndarray:
    """An image whose rows differ (so a rotation shows), top-left corner marked red."""
    rng = np.random.default_rng(seed)
    img = np.kron(rng.integers(0, 200, (h // 4, w // 4, 3), dtype=np.uint8), np.ones((4, 4, 1), dtype=np.uint8))
    img[:4, :4] = (255, 0, 0)
    return img


def user_folder(folder: Path) -> None:
    """PNG, an EXIF-rotated JPEG, a grayscale PNG, a corrupt file, a duplicate, a non-image file."""
    folder.mkdir(parents=True)
    Image.fromarray(picture(40, 60, 0)).save(folder / "a.png")
    rotated = Image.fromarray(picture(40, 60, 1))
    exif = rotated.getexif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90 degrees clockwise
    (folder / "sub").mkdir()
    rotated.save(folder / "sub" / "rot.jpg", exif=exif, quality=95)
    Image.fromarray(picture(32, 32, 2)[..., 0]).convert("L").save(folder / "gray.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    shutil.copy(folder / "a.png", folder / "copy-of-a.png")
    (folder / "notes.txt").write_text("not an image: a folder entry skips it")


def test_import_folder_rows_orientation_errors_duplicates_and_one_new_file(tmp_path):
    from flows.import_images import import_flow

    user_folder(tmp_path / "mine")
    cfg = Sources(images=("mine",), max_size=48)
    out = tmp_path / "data" / "imported"
    first = import_flow(cfg, str(out), str(tmp_path))
    # 5 image files: a, its duplicate, rot, gray, broken -> 4 items (the duplicate once), 1 failed
    assert (first["files"], first["items"], first["duplicates"], first["computed"], first["failed"]) == (5, 4, 1, 3, 1)
    rows = {r["source"]: r for r in read_table(out).to_pylist()}
    assert set(rows) == {"mine/a.png", "mine/gray.png", "mine/sub/rot.jpg"}
    for r in rows.values():
        assert r["provenance"] == "imported" and r["model"] == "imported" and r["id"].startswith("i-")
        image = decode_png(r["image"])
        assert image.shape == (r["height"], r["width"], 3)  # RGB, also the grayscale one
        assert max(r["width"], r["height"]) <= 48
    a = rows["mine/a.png"]
    assert (a["original_width"], a["original_height"]) == (60, 40) and (a["width"], a["height"]) == (48, 32)
    assert decode_png(a["image"])[0, 0].tolist() == pytest.approx([255, 0, 0], abs=40)  # resized, not cropped
    rot = rows["mine/sub/rot.jpg"]
    assert (rot["original_width"], rot["original_height"]) == (40, 60)  # EXIF orientation applied
    assert decode_png(rot["image"])[0, -1, 0] > 180 and decode_png(rot["image"])[0, 0, 0] < 180  # red corner top-right
    errors = read_errors(out)
    assert [e["id"] for e in errors] == ["mine/broken.png"] and "cannot be read as an image" in errors[0]["reason"]

    Image.fromarray(picture(36, 36, 3)).save(tmp_path / "mine" / "new.png")
    second = import_flow(cfg, str(out), str(tmp_path))
    assert (second["items"], second["computed"], second["failed"]) == (5, 1, 1)  # the new file; the broken one retried
    again = {r["source"]: r["key"] for r in read_table(out).to_pylist()}
    assert {k: again[k] for k in rows} == {k: r["key"] for k, r in rows.items()}  # keys are content hashes

    Image.fromarray(picture(36, 36, 4)).save(tmp_path / "mine" / "new.png")  # a changed file: that item only
    third = import_flow(cfg, str(out), str(tmp_path))
    assert (third["items"], third["computed"]) == (5, 1)


def test_the_scan_of_the_files_stays_outside_the_table(tmp_path):
    """The table's bytes depend on the files' contents only: touching them
    (a fresh checkout, a re-render of the same scenes) is seen as a change
    by the scan, and the rerun gives the same table byte for byte, so the
    stages reading it stay up to date.  A table this workspace did not make
    (pulled, checked out) is taken as it is, its files as they are now the
    baseline of the next scan."""
    import os

    from flows.import_images import import_flow
    from mirage.data.sources import scan_record, sources_changed

    user_folder(tmp_path / "mine")
    cfg = Sources(images=("mine",), max_size=48)
    out = tmp_path / "data" / "imported"
    assert not sources_changed(tmp_path, cfg.images, out)  # never made: DVC runs the stage anyway
    import_flow(cfg, str(out), str(tmp_path))
    assert scan_record(tmp_path, out) == tmp_path / ".mirage" / "scans" / "data" / "imported.json"
    table = {p.name: p.read_bytes() for p in out.iterdir()}
    assert "digest" not in __import__("json").loads(table["sources.json"])
    assert not sources_changed(tmp_path, cfg.images, out)

    for f in (tmp_path / "mine").rglob("*.png"):
        os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    assert sources_changed(tmp_path, cfg.images, out)
    assert import_flow(cfg, str(out), str(tmp_path))["computed"] == 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == table
    assert not sources_changed(tmp_path, cfg.images, out)

    scan_record(tmp_path, out).unlink()  # the table pulled into a fresh clone: no scan of ours
    assert not sources_changed(tmp_path, cfg.images, out)  # taken as DVC takes it, these files the baseline
    assert scan_record(tmp_path, out).exists()
    Image.fromarray(picture(36, 36, 6)).save(tmp_path / "mine" / "added.png")
    assert sources_changed(tmp_path, cfg.images, out)  # a file added after the pull is seen
    (tmp_path / "mine" / "added.png").unlink()
    assert not sources_changed(tmp_path, cfg.images, out)
    Image.fromarray(picture(36, 36, 5)).save(tmp_path / "other.png")
    other = tmp_path / "other"
    import_flow(Sources(images=("other.png",), max_size=48), str(other), str(tmp_path))
    shutil.rmtree(out)
    shutil.copytree(other, out)  # another table checked out in its place: the record is of the one before
    (tmp_path / "mine" / "a.png").touch()
    assert not sources_changed(tmp_path, cfg.images, out)  # not compared with that record: taken as it is


def test_bad_source_entries_are_named(tmp_path):
    from mirage.data.sources import find_files

    (tmp_path / "empty").mkdir()
    for entries, named in [(("missing",), "sources.images[0] 'missing': no such file"),
                           (("empty",), "sources.images[0] 'empty': names no image file"),
                           (("empty/*.png",), "names no image file")]:
        with pytest.raises(ParamsError, match=named.replace("[", r"\[").replace("]", r"\]")):
            find_files(entries, tmp_path)
    (tmp_path / "set.json").write_text('{"images": [{"file_name": "x.png"}, {"file_name": "y.png"}]}')
    assert [f.name for f in find_files(("set.json",), tmp_path)] == ["x.png", "y.png"]  # relative to the JSON


def test_mix_weights_share_batches_between_sources():
    from tasks.train_detector import mix_weights

    sources = ["generated"] * 6 + ["imported"] * 2
    keep, p = mix_weights(sources, {"generated": 1.0, "imported": 1.0})
    assert len(keep) == 8 and p[:6].sum() == pytest.approx(0.5) and p[6:].sum() == pytest.approx(0.5)
    keep, p = mix_weights(sources, {"generated": 0.0, "imported": 1.0})
    assert keep.tolist() == [6, 7] and p is None  # one source left: uniform, as with generated images alone
    with pytest.raises(ValueError, match="train_detector.mix"):
        mix_weights(sources, {"generated": 0.0, "imported": 0.0})


def ood_folder(folder: Path, n: int) -> None:
    """`n` unlabeled ood scenes (a seed the ood split does not use) as PNG files."""
    from tasks.toyworld import render_scene

    world = load(Path(__file__).resolve().parents[1] / "params.yaml").toyworld
    folder.mkdir()
    split = world.ood.model_copy(update={"seed": 99})
    for i in range(n):
        Image.fromarray(render_scene(world, split, i).image).save(folder / f"{i:03d}.png")


@pytest.mark.slow
def test_discover_and_train_on_imported_images_only_then_on_a_mix(project):
    """On a copy of the finished tiny project (its generated images made):
    imported images only, then a mix with one more file in the folder."""
    from flows import pipeline
    from mirage.run import scheduler

    root = project
    ood_folder(root / "unlabeled", 16)
    imported_only = {"sources.images": ["unlabeled"], "discover.sources": ["imported"], "discover.method": "maskcut",
                     "train_detector.class_aware": False, "train_detector.steps": 60,  # the band's steps
                     "train_detector.self_train_steps": 30, "train_detector.mix": {"generated": 0.0, "imported": 1.0}}
    ran = {r.name: r for r in pipeline.run(root, imported_only)}
    assert [name for name, r in ran.items() if r.ran] == ["import", "concepts", "features", "curate", "discover", "train_detector",
                                                            "discover_splits", "evaluate"]
    assert ran["import"].result["computed"] == 16 and ran["features"].result["computed"] == 16
    found = read_table(root / "data" / "discovery").to_pylist()
    assert len(found) == 16 and all(r["image_id"].startswith("i-") for r in found)  # imported images only
    assert sum(len(r["objects"]) for r in found) > 16  # MaskCut: several objects per ood scene
    first = (root / "models" / "detector" / "round-0" / "model.safetensors").read_bytes()
    metrics = __import__("json").loads((root / "metrics" / "evaluate.json").read_text())
    assert set(metrics["splits"]) == {"test", "ood"} and len(metrics["splits"]["ood"]["detector"]) == 2
    ood = metrics["splits"]["ood"]  # bands around what this run measured (MaskCut AP50 0.63, detector 0.43 -> 0.61)
    assert 0.45 <= ood["discovery"]["maskcut"]["ap50"] <= 0.8
    assert ood["discovery"]["tokencut"]["ap50"] < ood["discovery"]["maskcut"]["ap50"]  # one box per image misses most
    assert ood["detector"][-1]["ap50"] >= 0.4

    Image.fromarray(np.full((32, 32, 3), 90, dtype=np.uint8)).save(root / "unlabeled" / "extra.png")
    assert "import" in scheduler.stale(root)  # DVC sees params only: mirage rescans the files
    mixed = pipeline.run(root, {"discover.sources": ["generated", "imported"],  # plumbing: TINY's few steps
                                "train_detector.mix": {"generated": 1.0, "imported": 1.0},
                                "train_detector.steps": TINY["train_detector"]["steps"],
                                "train_detector.self_train_steps": TINY["train_detector"]["self_train_steps"]})
    ran = {r.name: r for r in mixed}
    assert ran["import"].result["computed"] == 1 and ran["features"].result["computed"] == 1  # the new file only
    assert ran["discover"].result["computed"] == 24 + 1  # the generated images, now wanted too, and the new file
    found = read_table(root / "data" / "discovery").to_pylist()
    assert sum(r["image_id"].startswith("i-") for r in found) == 17 and len(found) == 41
    assert (root / "models" / "detector" / "round-0" / "model.safetensors").read_bytes() != first
    assert scheduler.stale(root) == {}


def test_imported_method_cuts_imported_images_only_and_leaves_generated_keys_alone():
    cfg = load(Path(__file__).resolve().parents[1] / "params.yaml").discover.model_copy(
        update={"method": "tokencut", "imported_method": None})
    split = cfg.model_copy(update={"imported_method": "maskcut"})
    assert (cfg.method_for("imported"), split.method_for("imported"), split.method_for("generated")) == \
        ("tokencut", "maskcut", "tokencut")
    assert cfg.digest() == split.digest()  # generated items keep their keys; imported ones add their method
