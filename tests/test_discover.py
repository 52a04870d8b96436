from pathlib import Path

import numpy as np
import pytest

from mirage.data.images import decode_mask, encode_mask
from tasks.discover import affinity, cut_to_object, maskcut, second_eigenvector, tokencut

ROOT = Path(__file__).resolve().parents[1]


def block_features(grid, fg, rng, noise=0.05, dim=16):
    """Patch features: one direction for the background, another for the object."""
    bg_dir, fg_dir = np.eye(dim)[0], np.eye(dim)[1]
    f = np.where(fg.reshape(-1, 1), fg_dir, bg_dir) + rng.normal(0, noise, (grid[0] * grid[1], dim))
    return f.astype(np.float32)


def test_tokencut_finds_the_object_exactly():
    rng = np.random.default_rng(0)
    fg = np.zeros((8, 8), dtype=bool)
    fg[2:5, 3:7] = True
    cut = tokencut(block_features((8, 8), fg, rng), (8, 8), tau=0.2, eps=1e-5)
    assert np.array_equal(cut.patch_mask, fg)
    mask, box = cut_to_object(cut, 32, 32)
    assert box == [12.0, 8.0, 16.0, 12.0]  # patches 3..6 x 2..4 at 4 px per patch
    assert np.array_equal(decode_mask(encode_mask(mask), 32, 32), mask)


def test_connected_component_of_the_seed_only():
    rng = np.random.default_rng(1)
    fg = np.zeros((8, 8), dtype=bool)
    fg[1:4, 1:4] = True   # larger object holds the seed
    fg[6:8, 6:8] = True   # a separate blob on the same side of the cut
    cut = tokencut(block_features((8, 8), fg, rng), (8, 8), tau=0.2, eps=1e-5)
    assert cut.patch_mask.sum() in (9, 4)
    assert not (cut.patch_mask[1:4, 1:4].any() and cut.patch_mask[6:8, 6:8].any())


def test_solver_sign_does_not_change_the_result(monkeypatch):
    rng = np.random.default_rng(2)
    fg = np.zeros((8, 8), dtype=bool)
    fg[4:7, 0:3] = True
    feats = block_features((8, 8), fg, rng, noise=0.2)
    expected = tokencut(feats, (8, 8), 0.2, 1e-5).patch_mask
    eigh = np.linalg.eigh
    monkeypatch.setattr("tasks.discover.np.linalg.eigh", lambda m: (eigh(m)[0], -eigh(m)[1]))
    x, _ = second_eigenvector(feats, 0.2, 1e-5)
    assert x[np.argmax(np.abs(x))] > 0
    assert np.array_equal(tokencut(feats, (8, 8), 0.2, 1e-5).patch_mask, expected)
    assert np.array_equal(expected, fg)


def test_sparse_solver_path_agrees_with_dense():
    rng = np.random.default_rng(3)
    fg = np.zeros((30, 30), dtype=bool)  # 900 nodes: above DENSE_MAX_NODES, so eigsh
    fg[5:15, 8:20] = True
    feats = block_features((30, 30), fg, rng, noise=0.2)
    x_sparse, val_sparse = second_eigenvector(feats, 0.2, 1e-5)
    import tasks.discover as d

    old = d.DENSE_MAX_NODES
    d.DENSE_MAX_NODES = 10_000
    try:
        x_dense, val_dense = second_eigenvector(feats, 0.2, 1e-5)
    finally:
        d.DENSE_MAX_NODES = old
    assert np.allclose(val_sparse, val_dense, atol=1e-6)
    assert np.array_equal(x_sparse > x_sparse.mean(), x_dense > x_dense.mean())
    assert np.array_equal(tokencut(feats, (30, 30), 0.2, 1e-5).patch_mask, fg)


def test_maskcut_finds_three_separate_objects():
    rng = np.random.default_rng(4)
    dim = 16
    regions = [(slice(1, 4), slice(1, 4)), (slice(1, 4), slice(10, 14)), (slice(9, 13), slice(5, 9))]
    labels = np.zeros((16, 16), dtype=int)
    for i, (r, c) in enumerate(regions, start=1):
        labels[r, c] = i
    feats = np.eye(dim)[labels.reshape(-1)] + rng.normal(0, 0.05, (256, dim))
    cuts = maskcut(feats, (16, 16), tau=0.2, eps=1e-5, max_objects=3)
    found = sorted(tuple(np.unique(labels[c.patch_mask])) for c in cuts)
    assert found == [(1,), (2,), (3,)]
    for c in cuts:
        assert c.patch_mask.sum() == (labels == labels[c.patch_mask][0]).sum()


def test_maskcut_drops_tiny_masks():
    rng = np.random.default_rng(5)
    labels = np.zeros((16, 16), dtype=int)
    labels[2:8, 2:8] = 1
    labels[12, 12] = 2  # one patch: 1/256 of the grid, under min_area
    feats = np.eye(8)[labels.reshape(-1)] + rng.normal(0, 0.05, (256, 8))
    cuts = maskcut(feats, (16, 16), 0.2, 1e-5, max_objects=3, min_area=0.01)
    assert all(c.patch_mask.sum() > 2 for c in cuts)
    assert any(np.array_equal(c.patch_mask, labels == 1) for c in cuts)


def test_an_arpack_failure_falls_back_to_the_dense_cut(monkeypatch):
    """Seen with tau 0.3 on UNet features: ARPACK stops with 'starting vector
    is zero'.  The cut then takes the dense solver's answer instead of failing."""
    from scipy.sparse.linalg import ArpackError

    import tasks.discover as discover

    n = discover.DENSE_MAX_NODES + 24
    rng = np.random.default_rng(0)
    graph = np.where(rng.random((n, n)) < 0.5, 1.0, 1e-5).astype(np.float32)
    graph = np.maximum(graph, graph.T)
    expected, value = discover.fiedler(graph)

    def fail(*args, **kwargs):
        raise ArpackError(-9)

    monkeypatch.setattr(discover, "eigsh", fail)
    x, dense_value = discover.fiedler(graph)
    assert dense_value == pytest.approx(value, abs=1e-4)
    assert abs(np.dot(x, expected) / np.linalg.norm(x) / np.linalg.norm(expected)) > 0.99


def merged_like(feats: np.ndarray, rng, groups: int) -> np.ndarray:
    """Features as Token Merging maps them back to the grid: patches fall into
    `groups` tokens (spanning patches of one region, not always adjacent) and
    take their token's mean features."""
    out = feats.copy()
    order = np.argsort(feats.argmax(1) * 10 + rng.random(len(feats)))  # regions stay apart
    for members in np.array_split(order, groups):
        out[members] = feats[members].mean(0)
    return out


@pytest.mark.parametrize("noise", [0.05, 0.3])
def test_a_cut_on_the_merged_graph_is_the_cut_on_the_patches(noise):
    """discover.on_merged: the solve on T' weighted nodes gives the patch graph's
    own cut (same masks, same eigenvalue to 1e-5) from P / T' times fewer nodes."""
    rng = np.random.default_rng(7)
    labels = np.zeros((16, 16), dtype=int)
    labels[1:6, 1:6], labels[2:5, 10:15], labels[9:14, 4:10] = 1, 2, 3
    feats = merged_like((np.eye(8)[labels.reshape(-1)] + rng.normal(0, noise, (256, 8))).astype(np.float32), rng, 64)
    assert len(np.unique(feats, axis=0)) == 64
    one, merged = tokencut(feats, (16, 16), 0.2, 1e-5), tokencut(feats, (16, 16), 0.2, 1e-5, merged=True)
    assert np.array_equal(one.patch_mask, merged.patch_mask) and abs(one.eigenvalue - merged.eigenvalue) < 1e-5
    plain = maskcut(feats, (16, 16), 0.2, 1e-5, max_objects=3)
    cut = maskcut(feats, (16, 16), 0.2, 1e-5, max_objects=3, merged=True)
    assert len(plain) == len(cut) >= 2
    for a, b in zip(plain, cut):
        assert np.array_equal(a.patch_mask, b.patch_mask) and abs(a.eigenvalue - b.eigenvalue) < 1e-5


def _iou(x: np.ndarray, y: np.ndarray) -> float:
    a, b = x > x.mean(), y > y.mean()
    return (a & b).sum() / (a | b).sum()


@pytest.mark.parametrize("sizes", [[60, 257, 400], [401, 900, 523]], ids=["dense", "lanczos"])
def test_the_batched_solver_gives_each_graph_its_own_cut(sizes):
    """discover.solver torch: graphs of different sizes solved together (padded)
    give each one's own Fiedler vector: the sign, the bipartition and the
    eigenvalue of the one-at-a-time solve (`fiedler`)."""
    import torch

    from tasks.discover import fiedler, fiedler_batch

    rng = np.random.default_rng(3)
    graphs = []
    for n in sizes:
        fg = rng.random(n) < 0.3
        feats = np.where(fg[:, None], 1.0, -1.0) * rng.normal(size=(1, 16)) + rng.normal(0, 1.5, (n, 16))
        graphs.append(affinity(feats, 0.1, 1e-5))
    together = fiedler_batch([torch.from_numpy(g) for g in graphs])
    for graph, (x, value) in zip(graphs, together):
        expected, expected_value = fiedler(graph)
        assert len(x) == len(graph) and value == pytest.approx(expected_value, abs=1e-4)
        assert _iou(x, expected) >= 0.99 and np.dot(x, expected) > 0


def test_the_batched_solver_on_equal_degrees_and_on_few_distinct_patches():
    """Two equal blocks (every degree equal: ARPACK's start vector is zero, the
    batched solve starts from a fixed draw) and a graph of 5 distinct rows
    among 600 (its Krylov space ends after a few steps) in one batch."""
    import torch

    from tasks.discover import fiedler, fiedler_batch

    n = 500
    blocks = np.full((n, n), 1e-5, dtype=np.float32)
    blocks[: n // 2, : n // 2] = blocks[n // 2 :, n // 2 :] = 1.0
    rng = np.random.default_rng(0)
    rows = np.eye(8)[[0, 0, 1, 1, 1]] + rng.normal(0, 0.1, (5, 8))  # 2 objects of 2 and 3 distinct rows
    few = affinity(rows[rng.integers(0, 5, 600)], 0.5, 1e-5)
    (x, value), (y, few_value) = fiedler_batch([torch.from_numpy(blocks), torch.from_numpy(few)])
    assert np.array_equal(x > x.mean(), np.arange(n) < n // 2) or np.array_equal(x > x.mean(), np.arange(n) >= n // 2)
    assert value == pytest.approx(fiedler(blocks)[1], abs=1e-4)
    expected, expected_value = fiedler(few)
    assert few_value == pytest.approx(expected_value, abs=1e-4) and _iou(y, expected) >= 0.99


@pytest.mark.parametrize("merged", [False, True])
def test_the_torch_solver_finds_the_scipy_solvers_objects(merged):
    """discover_images with discover.solver torch (every image of the batch in
    one solve per round) finds the masks of the scipy solver, image by image,
    for TokenCut and MaskCut, on the patches and on the merged graph."""
    import torch

    from mirage.data.params import load
    from tasks.discover import discover_images

    base = load(ROOT / "params.yaml").discover.model_copy(update={"tau": 0.2, "on_merged": merged})
    rng = np.random.default_rng(11)
    images = []
    for k in range(4):  # three objects each, at other places (576 patches: Lanczos; merged, 150 tokens: dense)
        labels = np.zeros((24, 24), dtype=int)
        labels[1 + k : 8 + k, 2:9], labels[3:9, 12 + k : 20], labels[14:21, 5 + k : 13 + k] = 1, 2, 3
        feats = (np.eye(8)[labels.reshape(-1)] + rng.normal(0, 0.2, (576, 8))).astype(np.float32)
        images.append(merged_like(feats, rng, 150) if merged else feats)
    for method in ("tokencut", "maskcut"):
        cfg = base.model_copy(update={"method": method})
        one = discover_images(images, (24, 24), cfg, torch.device("cpu"))
        together = discover_images(images, (24, 24), cfg.model_copy(update={"solver": "torch"}), torch.device("cpu"))
        assert [len(c) for c in one] == [len(c) for c in together]
        assert all(len(c) >= (2 if method == "maskcut" else 1) for c in one)
        for a, b in zip(sum(one, []), sum(together, [])):
            assert np.array_equal(a.patch_mask, b.patch_mask) and abs(a.eigenvalue - b.eigenvalue) < 1e-4


def test_methods_sharing_graphs_cut_what_each_cuts_alone():
    """evaluate cuts TokenCut and MaskCut on the same graphs (built once, the
    whole-graph solve kept): each method's cuts equal its own fresh run's."""
    import torch

    from mirage.data.params import load
    from tasks.discover import cut_graphs, discover_images, graphs_of

    cfg = load(ROOT / "params.yaml").discover.model_copy(update={"tau": 0.2})
    rng = np.random.default_rng(5)
    labels = np.zeros((16, 16), dtype=int)
    labels[1:6, 1:6], labels[9:14, 4:10] = 1, 2
    images = [(np.eye(8)[labels.reshape(-1)] + rng.normal(0, 0.3, (256, 8))).astype(np.float32) for _ in range(3)]
    graphs = graphs_of(images, cfg, torch.device("cpu"))
    for method in ("tokencut", "maskcut"):
        method_cfg = cfg.model_copy(update={"method": method})
        shared = cut_graphs(graphs, (16, 16), method_cfg)
        alone = discover_images(images, (16, 16), method_cfg, torch.device("cpu"))
        assert [len(c) for c in shared] == [len(c) for c in alone]
        for a, b in zip(sum(shared, []), sum(alone, [])):
            assert np.array_equal(a.patch_mask, b.patch_mask) and a.eigenvalue == b.eigenvalue
    assert all(g.whole is not None for g in graphs)


def test_a_graph_the_batched_lanczos_leaves_unconverged_takes_the_one_image_solve(monkeypatch):
    """Restarts exhausted above the tolerance: that graph's cut comes from
    `fiedler` (ARPACK) instead of an unconverged vector; converged ones stay."""
    import torch

    import tasks.discover as discover

    rng = np.random.default_rng(2)
    feats = [np.where((rng.random(n) < 0.3)[:, None], 1.0, -1.0) * rng.normal(size=(1, 16))
             + rng.normal(0, 2.0, (n, 16)) for n in (500, 520)]
    graphs = [affinity(f, 0.05, 1e-5) for f in feats]
    monkeypatch.setattr(discover, "LANCZOS_STEPS", 3)
    monkeypatch.setattr(discover, "LANCZOS_RESTARTS", 1)
    calls = []
    real_fiedler = discover.fiedler
    monkeypatch.setattr(discover, "fiedler", lambda g: calls.append(len(g)) or real_fiedler(g))
    out = discover.fiedler_batch([torch.from_numpy(g) for g in graphs])
    assert sorted(calls) == [500, 520]  # 3 Lanczos vectors once: neither converged
    for graph, (x, value) in zip(graphs, out):
        expected, expected_value = real_fiedler(graph)
        assert np.array_equal(x, expected) and value == expected_value


def test_a_graph_is_its_lower_triangle_with_the_whole_products_bytes():
    """`affinity` keeps the lower triangle of f f^T thresholded (the upper is
    0), whose mirror is byte for byte NumPy's whole f @ f.T thresholded; a
    solve reads the lower triangle only, so a whole symmetric matrix gives
    the same bytes."""
    from tasks.discover import fiedler, mirrored

    rng = np.random.default_rng(6)
    for n, tau in ((3, 0.1), (300, 0.1), (700, 0.2)):  # up to 256 rows: one block; 700: three
        feats = rng.normal(size=(n, 24)).astype(np.float32)
        f = feats / np.linalg.norm(feats, axis=1, keepdims=True)
        whole = np.where(f @ f.T >= tau, 1.0, 1e-5).astype(np.float32)
        graph = affinity(feats, tau, 1e-5)
        assert graph.dtype == np.float32 and graph.flags.c_contiguous
        assert not np.triu(graph, 1).any()
        assert np.array_equal(mirrored(graph), whole)
        for (x, value), (y, whole_value) in zip([fiedler(graph)], [fiedler(whole)]):
            assert np.array_equal(x, y) and value == whole_value


def test_a_cut_of_some_nodes_masks_the_rest_as_the_sub_graph_would():
    """MaskCut's later rounds: the ARPACK solve of a Restriction (the nodes
    left after a cut, the others masked in the whole graph) finds the cut
    and the eigenvalue of the sub-graph copied out."""
    from tasks.discover import DENSE_MAX_NODES, Restriction, _sub, fiedler

    rng = np.random.default_rng(7)
    n = 1200
    labels = rng.integers(0, 3, n)
    feats = np.eye(8)[labels] + rng.normal(0, 0.2, (n, 8))
    graph = affinity(feats, 0.3, 1e-5)
    nodes = np.flatnonzero(labels > 0)  # the first object cut away
    assert len(nodes) > DENSE_MAX_NODES
    x, value = fiedler(Restriction(graph, nodes))
    expected, expected_value = fiedler(_sub(graph, nodes))
    assert len(x) == len(nodes) and value == pytest.approx(expected_value, abs=1e-5)
    assert _iou(x, expected) == 1.0 and np.dot(x, expected) > 0
    assert np.array_equal(x > x.mean(), labels[nodes] == labels[nodes][np.argmax(x)])
