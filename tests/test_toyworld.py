from pathlib import Path

import numpy as np
import pytest

from mirage import params
from mirage.images import box_iou, mask_to_box
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
