"""Stage curate's decisions on embeddings with planted duplicates: found with
high precision and recall, balanced sampling fills each cluster's share, new
images keep the earlier decisions, and the stage's output feeds discover."""
from __future__ import annotations

import numpy as np

from mirage.data.params import Curate
from tasks.curate import balanced, curate, water_fill


def planted(n: int = 400, copies: int = 80, dim: int = 64, noise: float = 0.01, seed: int = 0):
    """n distinct unit vectors in 8 blobs, then `copies` near-copies of some
    of them (small noise): (ids, embeddings, id of each copy's original)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(8, dim))
    base = centres[rng.integers(0, 8, n)] + 0.6 * rng.normal(size=(n, dim))
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    originals = rng.choice(n, copies, replace=False)
    dup = base[originals] + noise * rng.normal(size=(copies, dim))
    emb = np.concatenate([base, dup / np.linalg.norm(dup, axis=1, keepdims=True)]).astype(np.float32)
    ids = [f"g{i:04d}" for i in range(n + copies)]
    return ids, emb, {ids[n + j]: ids[o] for j, o in enumerate(originals)}


def dedup_scores(table, truth: dict[str, str]) -> tuple[float, float]:
    """Precision and recall of the pairs found: a found duplicate is right when
    it or the image it duplicates is a planted copy of the other."""
    rows = table.to_pylist()
    found = {r["id"]: r["nearest_kept"] for r in rows if r["reason"] == "duplicate"}
    pairs = {frozenset(p) for p in truth.items()}
    right = sum(frozenset((i, k)) in pairs for i, k in found.items())
    return right / max(len(found), 1), right / len(truth)


def test_planted_duplicates_are_found():
    ids, emb, truth = planted()
    out = curate(Curate(enabled=True, dedup_eps=0.05, clusters=(16, 4)), ids, [None] * len(ids), emb, "m", None)
    precision, recall = dedup_scores(out.table, truth)
    assert precision >= 0.95 and recall >= 0.95, (precision, recall)
    reasons = out.table.column("reason").to_pylist()
    assert reasons.count("duplicate") == len(truth) and reasons.count("balance") == 0  # no target: all unique kept


def test_a_looser_eps_finds_more_and_wrong_pairs_a_tight_one_misses_none_of_the_exact():
    ids, emb, truth = planted(noise=0.02)
    loose = curate(Curate(enabled=True, dedup_eps=0.5, clusters=(16, 4)), ids, [None] * len(ids), emb, "m", None)
    tight = curate(Curate(enabled=True, dedup_eps=0.001, clusters=(16, 4)), ids, [None] * len(ids), emb, "m", None)
    assert dedup_scores(loose.table, truth)[0] < 0.8  # distinct images called duplicates
    assert dedup_scores(tight.table, truth)[1] < 0.5  # copies with noise 0.02 are further than 0.001


def test_balanced_sampling_fills_equal_shares_capped_by_small_clusters():
    assert water_fill([2, 10, 10], 12) == [2, 5, 5]
    assert water_fill([3, 3], 10) == [3, 3]
    labels = np.array([[0, 0]] * 50 + [[1, 0]] * 10 + [[2, 1]] * 40, np.int32)  # level-1: {0, 1} and {2}
    keys = [f"k{i}" for i in range(100)]
    kept = balanced(list(range(100)), labels, keys, target=40, per_cluster=None, seed=0)
    top = [int(labels[r, 1]) for r in kept]
    assert len(kept) == 40 and top.count(0) == 20 and top.count(1) == 20  # the top level splits evenly
    first = [int(labels[r, 0]) for r in kept if labels[r, 1] == 0]
    assert first.count(0) == 10 and first.count(1) == 10
    capped = balanced(list(range(100)), labels, keys, target=None, per_cluster=5, seed=0)
    assert len(capped) == 15


def test_new_images_keep_the_earlier_decisions_and_clusters():
    ids, emb, truth = planted()
    cfg = Curate(enabled=True, dedup_eps=0.05, clusters=(16, 4))
    n = 300
    first = curate(cfg, ids[:n], [None] * n, emb[:n], "m", None)
    second = curate(cfg, ids, [None] * len(ids), emb, "m", first.state)
    assert second.reused == n
    assert second.state["levels"] == first.state["levels"]  # the same clusters: new images assigned to them
    before = {r["id"]: (r["kept"], r["cluster_0"]) for r in first.table.to_pylist()}
    after = {r["id"]: (r["kept"], r["cluster_0"]) for r in second.table.to_pylist()}
    assert all(after[i] == before[i] for i in before)
    precision, recall = dedup_scores(second.table, truth)
    assert precision >= 0.95 and recall >= 0.95
    other = curate(cfg.model_copy(update={"clusters": (8, 2)}), ids, [None] * len(ids), emb, "m", first.state)
    assert other.reused == 0 and len(other.state["levels"][0]) == 8  # other clustering params: recomputed
