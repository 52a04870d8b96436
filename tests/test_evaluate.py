import numpy as np
import pytest

from tasks.evaluate import coco_detection, corloc, prompt_alignment


def test_corloc_hand_cases():
    gt = [[[0, 0, 10, 10]], [[0, 0, 10, 10], [20, 20, 10, 10]], [[0, 0, 10, 10]], [[5, 5, 4, 4]]]
    pred = [
        [0, 0, 10, 10],   # exact: hit
        [21, 21, 10, 10], # IoU 81/119 = 0.68 with the second box: hit
        [5, 0, 10, 10],   # IoU 50/150 = 0.33: miss
        [0, 0, 0, 0],     # nothing found: miss
    ]
    assert corloc(pred, gt, 0.5) == 0.5
    assert corloc(pred, gt, 0.3) == 0.75


def test_coco_ap_perfect_and_half_recall():
    gt = [[[0, 0, 10, 10], [20, 20, 8, 8]], [[4, 4, 12, 12]]]
    perfect = [{"boxes": np.array(b, dtype=float), "scores": np.ones(len(b))} for b in gt]
    stats, pr = coco_detection(gt, perfect, (32, 32))
    assert stats["AP"] == pytest.approx(1.0) and stats["AP50"] == pytest.approx(1.0)
    assert (pr == 1).all()
    # two of three objects found, no false positive: precision 1 up to recall 2/3
    partial = [{"boxes": np.array([[0, 0, 10, 10]], dtype=float), "scores": np.array([0.9])},
               {"boxes": np.array([[4, 4, 12, 12]], dtype=float), "scores": np.array([0.8])}]
    stats, _ = coco_detection(gt, partial, (32, 32))
    assert stats["AP50"] == pytest.approx(67 / 101, abs=1e-6)
    stats, _ = coco_detection(gt, [{"boxes": np.zeros((0, 4)), "scores": np.zeros(0)}] * 2, (32, 32))
    assert stats["AP50"] == 0.0


def test_coco_ap_class_aware_penalises_wrong_labels():
    gt = [[[0, 0, 10, 10]], [[4, 4, 12, 12]]]
    labels = [[1], [2]]
    right = [{"boxes": np.array(b, dtype=float), "scores": np.ones(1), "labels": np.array(l)} for b, l in zip(gt, labels)]
    wrong = [{**d, "labels": np.array([3 - d["labels"][0]])} for d in right]
    assert coco_detection(gt, right, (32, 32), labels, 2)[0]["AP50"] == pytest.approx(1.0)
    assert coco_detection(gt, wrong, (32, 32), labels, 2)[0]["AP50"] == 0.0
    assert coco_detection(gt, wrong, (32, 32))[0]["AP50"] == pytest.approx(1.0)  # class-agnostic ignores labels


def test_prompt_alignment():
    text = np.eye(3)
    images = np.array([[1, 0, 0], [0, 0.9, 0.1], [0.6, 0.4, 0], [0, 0, 1]])
    assert prompt_alignment(images, text, [0, 1, 1, 2]) == 0.75


def test_split_discovery_table_gives_evaluate_the_boxes_it_was_given(tmp_path):
    """discover_splits' rows, through Parquet, come back to evaluate bit for bit,
    per (split, weights, method) in image order; a table made for other splits is refused."""
    import pyarrow as pa

    from mirage.data import schema
    from mirage.data.store import write_parquet
    from tasks.discover_splits import split_rows
    from tasks.evaluate import found_in, split_boxes

    rng = np.random.default_rng(0)

    def per_image(n):  # an image with no cut among them
        return [{"boxes": rng.random((k, 4)) * 64, "scores": 1 - rng.random(k)} for k in [2, 0, 1, 3][:n]]

    learned = {"maskcut": per_image(4), "tokencut": per_image(4)}
    random = {"maskcut": per_image(4)}
    ood = {"maskcut": per_image(3), "tokencut": per_image(3)}
    rows = split_rows("test", "learned", learned) + split_rows("test", "random", random) + split_rows("ood", "learned", ood)
    rows = rows[::-1]  # any row order
    path = tmp_path / "splits.parquet"
    write_parquet(path, pa.Table.from_pylist(rows, schema=schema.SPLIT_BOXES))
    boxes = split_boxes(str(path))
    for (split, weights, found) in [("test", "learned", learned), ("test", "random", random), ("ood", "learned", ood)]:
        for method, expected in found.items():
            got = found_in(boxes, split, weights, method, len(expected))
            assert all(np.array_equal(g["boxes"], e["boxes"]) and g["boxes"].shape == (len(e["boxes"]), 4)
                       and np.array_equal(g["scores"], e["scores"]) for g, e in zip(got, expected))
    with pytest.raises(ValueError, match="split 'ood', not its 300 images: run stage discover_splits"):
        found_in(boxes, "ood", "learned", "maskcut", 300)
    with pytest.raises(ValueError, match="0 random-weight tokencut rows of split 'test'"):
        found_in(boxes, "test", "random", "tokencut", 4)
