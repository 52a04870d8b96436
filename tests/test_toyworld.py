from pathlib import Path

import numpy as np
import pytest

from mirage.data import params
from mirage.data.images import box_iou, mask_to_box
from tasks.toyworld import check_names, render_scene

CFG = params.load(Path(__file__).resolve().parents[1] / "params.yaml").toyworld


def test_scenes_are_deterministic_and_distinct():
    a, b = render_scene(CFG, CFG.test, 3), render_scene(CFG, CFG.test, 3)
    assert np.array_equal(a.image, b.image)
    assert not np.array_equal(a.image, render_scene(CFG, CFG.test, 4).image)


def test_ground_truth_matches_the_picture():
    counts = []
    for i in range(40):
        scene = render_scene(CFG, CFG.test, i)
        counts.append(len(scene.objects))
        assert scene.image.shape == (CFG.image_size, CFG.image_size, 3)
        boxes = np.array([mask_to_box(o.mask) for o in scene.objects])
        for obj, box in zip(scene.objects, boxes):
            assert obj.class_name in CFG.classes and obj.color in CFG.colors
            assert f"a {obj.color} {obj.class_name}" in scene.caption
            lo, hi = CFG.object_size
            assert lo - 1 <= max(box[2], box[3]) <= hi + 1
        masks = np.array([o.mask for o in scene.objects])
        assert (masks.sum(0) <= 1).all()  # objects never overlap
        iou = box_iou(boxes, boxes) - np.eye(len(boxes))
        assert (iou < 0.5).all()
    assert min(counts) == CFG.test.min_objects and max(counts) == CFG.test.max_objects


def test_unknown_shape_is_named():
    bad = CFG.model_copy(update={"classes": ("circle", "hexagon")})
    with pytest.raises(ValueError, match="toyworld.classes: unknown shape 'hexagon'"):
        check_names(bad)


def test_ood_split_is_deterministic_and_disjoint_in_shape_family_from_train():
    ood = CFG.ood
    assert ood is not None and not set(ood.shapes) & set(CFG.classes)  # shape families train never had
    assert not set(ood.textures) & {"gradient", "noise"}  # nor their textures
    a, b = render_scene(CFG, ood, 5), render_scene(CFG, ood, 5)
    assert np.array_equal(a.image, b.image) and [o.class_name for o in a.objects] == [o.class_name for o in b.objects]
    reseeded = render_scene(CFG, ood.model_copy(update={"seed": ood.seed + 10}), 5)
    assert not np.array_equal(a.image, reseeded.image)  # the seed decides the scenes
    shapes, counts = set(), []
    for i in range(60):
        scene = render_scene(CFG, ood, i)
        shapes |= {o.class_name for o in scene.objects}
        counts.append(len(scene.objects))
        masks = np.array([o.mask for o in scene.objects])
        assert (masks.sum(0) <= 1).all()
    assert shapes == set(ood.shapes)
    assert max(counts) == ood.max_objects and np.mean(counts) > 2  # more objects than the test split's 1-3
    train_shapes = {o.class_name for i in range(60) for o in render_scene(CFG, CFG.train, i).objects}
    assert train_shapes <= set(CFG.classes) and not train_shapes & shapes


def test_ood_keys_leave_the_other_splits_alone():
    from tasks.toyworld import scene_key

    assert CFG.split_digest("train") == CFG.model_copy(update={"ood": None}).split_digest("train")
    with_world = CFG.ood.model_copy(update={"shapes": None, "textures": None})
    assert scene_key(CFG, CFG.ood, 0) != scene_key(CFG, with_world, 0)


def test_unknown_ood_shape_is_named():
    bad = CFG.model_copy(update={"ood": CFG.ood.model_copy(update={"shapes": ("diamond", "blob")})})
    with pytest.raises(ValueError, match="toyworld.ood.shapes: unknown shape 'blob'"):
        check_names(bad)


def test_unlabeled_split_is_a_folder_of_pngs_rewritten_only_where_it_changed(tmp_path):
    """The default sources.images: PNG files of the test world with another seed
    (never an evaluated scene), written once, kept as they are on a rerun."""
    from flows.toyworld import write_unlabeled
    from mirage.data.images import decode_png

    cfg = CFG.model_copy(update={"unlabeled": CFG.unlabeled.model_copy(update={"n": 5})})
    folder = tmp_path / "unlabeled"
    assert write_unlabeled(cfg, folder) == {"items": 5, "computed": 5}
    files = sorted(folder.glob("*.png"))
    assert [f.name for f in files] == [f"s{cfg.unlabeled.seed}-{i:06d}.png" for i in range(5)]
    assert np.array_equal(decode_png(files[2].read_bytes()), render_scene(cfg, cfg.unlabeled, 2).image)
    assert cfg.unlabeled.seed not in (cfg.test.seed, cfg.ood.seed, cfg.train.seed)
    times = [f.stat().st_mtime_ns for f in files]
    (folder / "stray.png").write_bytes(b"not a scene")
    files[0].write_bytes(b"damaged")
    assert write_unlabeled(cfg, folder) == {"items": 5, "computed": 1}  # only the damaged file
    assert [f.stat().st_mtime_ns for f in sorted(folder.glob("*.png"))][1:] == times[1:]
    assert not (folder / "stray.png").exists()
    assert write_unlabeled(cfg.model_copy(update={"unlabeled": None}), folder) == {"items": 0, "computed": 0}
    # stage import depends on the folder: it stays, with a file DVC can track (no image: import finds none)
    assert [f.name for f in folder.iterdir()] == ["README.txt"]
