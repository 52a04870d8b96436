"""Evaluation on a COCO-format dataset on disk, checked against the in-memory path."""
import json

import numpy as np
import pytest
from PIL import Image

from mirage.cli import main as cli_main
from mirage.data import params
from mirage.data.images import mask_to_box
from tasks.coco_dataset import load_coco
from tasks.evaluate import coco_detection
from tasks.toyworld import render_scene
from tasks.train_detector import predict, save_detector, train


@pytest.fixture(scope="module")
def coco_dir(tmp_path_factory):
    """Eight toy scenes written as PNG files + a COCO annotation file with real categories."""
    cfg = params.load("params.yaml").toyworld
    root = tmp_path_factory.mktemp("coco")
    (root / "images").mkdir()
    data = {"images": [], "annotations": [], "categories": [{"id": i + 1, "name": c} for i, c in enumerate(cfg.classes)]}
    for i in range(8):
        scene = render_scene(cfg, cfg.test, i)
        Image.fromarray(scene.image).save(root / "images" / f"{i}.png")
        data["images"].append({"id": 100 + i, "file_name": f"{i}.png", "width": 32, "height": 32})
        for o in scene.objects:
            box = mask_to_box(o.mask)
            data["annotations"].append({"id": len(data["annotations"]) + 1, "image_id": 100 + i, "bbox": box,
                                        "category_id": cfg.classes.index(o.class_name) + 1, "area": box[2] * box[3], "iscrowd": 0})
    (root / "instances.json").write_text(json.dumps(data))
    return root


def test_eval_coco_matches_in_memory_evaluation(coco_dir, tmp_path, capsys):
    items = load_coco(coco_dir / "instances.json", coco_dir / "images")
    images = np.stack([np.asarray(Image.open(it.path).convert("RGB")) for it in items])
    cfg = params.load("params.yaml").train_detector.model_copy(update={"steps": 20, "batch_size": 4})
    model, dcfg = train(cfg, images, [{"boxes": it.boxes, "labels": [1] * len(it.boxes)} for it in items])
    save_detector(model, dcfg, tmp_path / "det" / "round-0")
    dets = [{k: v[d["scores"] >= 0.05] for k, v in d.items()} for d in predict(model, images)]
    expected, _ = coco_detection([it.boxes for it in items], dets, (32, 32))

    out = tmp_path / "coco.json"
    code = cli_main(["eval-coco", "--annotations", str(coco_dir / "instances.json"), "--images",
                     str(coco_dir / "images"), "--detector", str(tmp_path / "det"), "--out", str(out)])
    assert code == 0
    got = json.loads(out.read_text())
    assert got["images"] == 8 and got["detector"].endswith("round-0")
    assert got["ap50"] == pytest.approx(expected["AP50"]) and got["ap"] == pytest.approx(expected["AP"])


def test_eval_coco_names_what_is_missing(coco_dir, tmp_path, capsys):
    code = cli_main(["eval-coco", "--annotations", str(coco_dir / "instances.json"), "--images", str(tmp_path)])
    assert code == 2
    assert "0.png (image id 100) not found" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": []}')
    assert cli_main(["eval-coco", "--annotations", str(bad), "--images", str(tmp_path)]) == 2
    assert "no 'annotations' list" in capsys.readouterr().err


def test_eval_coco_discovery_corloc_matches_the_evaluate_stage(coco_dir, tmp_path):
    from mirage.run.runner import LocalRunner
    from tasks.discover_splits import SplitDiscoveryJob, discover_split
    from tasks.evaluate import corloc, top_box

    p = params.load("params.yaml")
    items = load_coco(coco_dir / "instances.json", coco_dir / "images")
    images = np.stack([np.asarray(Image.open(it.path).convert("RGB")) for it in items])
    with LocalRunner() as run:  # what the evaluate stage does on the test split
        found = discover_split(run, SplitDiscoveryJob(p.features, p.discover, p.generate.model), images)
    expected = corloc([top_box(f) for f in found], [it.boxes for it in items], p.evaluate.iou)

    out = tmp_path / "coco.json"
    assert cli_main(["eval-coco", "--annotations", str(coco_dir / "instances.json"), "--images",
                     str(coco_dir / "images"), "--detector", "none", "--discovery", "--out", str(out)]) == 0
    got = json.loads(out.read_text())
    assert "detector" not in got and got["discovery"]["backbone"] == p.features.patch_backbone
    assert got["discovery"]["corloc"] == pytest.approx(expected)
    assert expected >= 0.5  # the committed toy UNet finds most objects in these scenes
