"""Stage concepts: the streaming statistics, best buddies, the ground-truth scores, and the stage on the toy models."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tasks.concept_stats import Accumulator, MaskScores, Moments, best_buddies, jaccard
from tasks.concepts import plan_chunks
from mirage.models.unit_maps import resize_maps


def _moments(a: np.ndarray, b: np.ndarray, batch: int) -> Moments:
    acc = Accumulator()
    for i in range(0, len(a), batch):
        acc.add(torch.from_numpy(a[i : i + batch]), torch.from_numpy(b[i : i + batch]))
    return acc.moments(a.shape[1], b.shape[1])


def test_streamed_chunks_combine_to_numpys_pearson():
    rng = np.random.default_rng(0)
    # a large common offset: Σx² − nμ² about zero would lose most digits in float32 inputs
    a = (rng.normal(size=(900, 7)) + 1000).astype(np.float32)
    b = (a[:, :5] * 0.5 + rng.normal(size=(900, 5)) - 300).astype(np.float32)
    chunks = [_moments(a[s], b[s], 64) for s in (slice(0, 100), slice(100, 550), slice(550, 900))]
    r = Moments.combine(chunks).correlation()
    want = np.corrcoef(a.astype(np.float64).T, b.astype(np.float64).T)[:7, 7:]
    assert np.abs(r - want).max() < 1e-5
    whole = _moments(a, b, 900)
    assert np.abs(whole.correlation() - want).max() < 1e-5
    assert Moments.combine(chunks).n == 900


def test_a_unit_that_never_varies_correlates_with_nothing():
    a = np.ones((50, 2), dtype=np.float32)
    a[:, 1] = np.arange(50)
    r = _moments(a, a.copy(), 16).correlation()
    assert r[0].tolist() == [0.0, 0.0] and r[1, 1] == pytest.approx(1.0, abs=1e-6)


def test_best_buddies_are_mutual_and_above_min_corr():
    corr = np.array([[0.9, 0.1, 0.0],
                     [0.8, 0.2, 0.1],   # its best (col 0) prefers row 0: a buddy only with top_k >= 2
                     [0.0, 0.1, 0.25]], dtype=np.float32)
    strict = best_buddies(corr, 1, 0.2)
    assert strict.pairs() == {(0, 0), (2, 2)}
    assert best_buddies(corr, 2, 0.2).pairs() == {(0, 0), (1, 0), (2, 2)}
    assert best_buddies(corr, 2, 0.3).pairs() == {(0, 0), (1, 0)}
    assert jaccard({1, 2}, {2, 3}) == pytest.approx(1 / 3) and jaccard(set(), set()) == 1.0


def test_mask_scores_match_sklearns_auroc_and_count_iou_by_image():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    fg = np.zeros((6, 8, 8), dtype=bool)
    fg[:, 2:5, 2:5] = True
    good = torch.from_numpy(np.where(fg, 2.0, -1.0) + rng.normal(scale=0.3, size=fg.shape)).float()
    noise = torch.from_numpy(rng.normal(size=fg.shape)).float()
    scores = MaskScores(2)
    for s in (slice(0, 4), slice(4, 6)):
        scores.add(torch.stack([good[s], noise[s]], 1), fg[s], 9 / 64)
    iou, auroc = scores.iou(), scores.auroc()
    assert iou[0] == pytest.approx(1.0) and iou[1] < 0.4
    for j, maps in enumerate((good, noise)):
        want = roc_auc_score(fg.ravel(), maps.numpy().ravel())
        assert abs(auroc[j] - want) < 0.02  # histogram bins of 0.05 z
    assert auroc[0] > 0.99 and 0.3 < auroc[1] < 0.7


def test_chunks_of_a_grown_set_keep_every_full_chunk():
    first = plan_chunks([f"k{i}" for i in range(10)], [], 4)
    assert first == [["k0", "k1", "k2", "k3"], ["k4", "k5", "k6", "k7"], ["k8", "k9"]]
    grown = plan_chunks(["k10", *[f"k{i}" for i in range(10)], "k11"], first, 4)
    assert grown[:2] == first[:2]  # reused: their moments are not computed again
    assert sorted(k for c in grown[2:] for k in c) == ["k10", "k11", "k8", "k9"]
    dropped = plan_chunks([f"k{i}" for i in range(10) if i != 5], first, 4)
    assert dropped[0] == first[0] and ["k4", "k5", "k6", "k7"] not in dropped


def test_maps_shrink_with_antialiasing():
    x = torch.zeros(1, 1, 32, 32)
    x[..., ::2] = 1.0  # stripes finer than the grid: their mean survives, not an aliased pattern
    small = resize_maps(x, 8)
    assert small.shape == (1, 1, 8, 8) and torch.allclose(small, torch.full_like(small, 0.5), atol=0.05)


def _stage(root, **overrides) -> dict:
    """Stage concepts' command, in-process, in `root` (as `mirage run` calls it)."""
    import os

    from flows.concepts import main
    from mirage.data.params import write_overrides

    if overrides:
        write_overrides(root / "params.yaml", {f"concepts.{k}": v for k, v in overrides.items()})
    cwd = os.getcwd()
    os.chdir(root)
    try:
        return main(["--params", "params.yaml", "--images", "data/generated", "--imported", "data/imported",
                     "--test", "data/toyworld/test", "--ood", "data/toyworld/ood", "--out", "data/concepts",
                     "--plot", "plots/concepts.png"])
    finally:
        os.chdir(cwd)


def _correlations(root) -> np.ndarray:
    from flows.concepts import CHUNK_TABLE
    from mirage.data.store import read_table
    from tasks.concept_stats import moments_from_bytes
    from tasks.concepts import combined

    blobs = read_table(root / "data/concepts" / CHUNK_TABLE, columns=["moments"]).column("moments").to_pylist()
    return combined([moments_from_bytes(b) for b in blobs], "models/encoder")["trained"].correlation()


def test_the_tiny_run_finds_concepts_and_evaluate_reports_them(done):
    import json

    import pyarrow.parquet as pq
    from PIL import Image

    m = json.loads((done / "data/concepts/measures.json").read_text())
    assert json.loads((done / "metrics/evaluate.json").read_text())["concepts"] == m
    assert (m["images"], m["chunks"], m["generator_units"], m["units"]) == (24, 2, 608, 2048)
    pairs = pq.read_table(done / "data/concepts/pairs.parquet").to_pylist()
    for condition in ("trained", "random", "shuffled"):
        mine = [p for p in pairs if p["condition"] == condition]
        assert len(mine) == m[condition]["best_buddies"]
        assert all(p["corr"] >= 0.3 for p in mine)  # concepts.min_corr
        assert {"test", "ood"} <= set(m[condition])
    # bands from the tiny run (24 generated images, 40 test scenes), measured: object concepts on test
    # trained 11 / random twins 2 / shuffled 1, best AUROC 0.954 / 0.855, best buddies 104 / 99 / 16, mean best
    # r 0.355 / 0.349 / 0.186.  Twins that kept the trained weights, or pairs not matched by image, cross them.
    t, r, s = m["trained"], m["random"], m["shuffled"]
    assert t["test"]["object_concepts"] >= max(r["test"]["object_concepts"], s["test"]["object_concepts"]) + 4
    assert t["test"]["best_auroc"] >= r["test"]["best_auroc"] + 0.05
    assert s["best_buddies"] <= t["best_buddies"] / 3 and s["mean_best_corr"] <= 0.7 * t["mean_best_corr"]
    assert r["best_buddies"] >= 0.5 * t["best_buddies"]  # random twins match colour as well: the count alone tells little
    trained = [p for p in pairs if p["condition"] == "trained"]
    assert {p["concept"] for p in trained} == set(range(m["concepts"]))
    assert sum(p["test_iou"] >= 0.5 for p in trained) == m["trained"]["test"]["object_concepts"]
    assert Image.open(done / "plots/concepts.png").size[0] >= 3 * 3 * 96


def test_more_images_compute_only_their_chunks_and_combine_exactly(project):
    """concepts.images 16 -> 20 (chunks of 16): the first chunk is reused, one
    chunk of 4 computed; the combined moments equal a from-scratch run's."""
    import shutil

    first = _stage(project, images=16)  # the tiny run's first chunk: all 16 reused
    assert (first["chunks"], first["computed"], first["reused"]) == (1, 0, 1)
    grown = _stage(project, images=20)
    assert (grown["chunks"], grown["computed"], grown["reused"]) == (2, 1, 1)
    r = _correlations(project)
    shutil.rmtree(project / "data/concepts")
    scratch = _stage(project, chunk=20)  # the 20 images in one chunk
    assert (scratch["chunks"], scratch["computed"]) == (1, 1)
    assert np.abs(_correlations(project) - r).max() < 1e-5
    again = _stage(project)
    assert again["computed"] == 0 and again["trained"] == scratch["trained"]


@pytest.mark.slow
def test_a_zoo_encoder_adds_its_own_measures_and_rosetta_units_need_every_one(project):
    import json

    result = _stage(project, images=8, models=["random:mirage-toy-clip:1"])
    m = json.loads((project / "data/concepts/measures.json").read_text())
    assert [z["model"] for z in m["zoo"]] == ["random:mirage-toy-clip:1"]
    assert {"trained", "random", "shuffled", "stability"} <= set(m["zoo"][0])
    assert result["computed"] == 1  # the zoo is part of a chunk's key
    import pyarrow.parquet as pq

    pairs = pq.read_table(project / "data/concepts/pairs.parquet").to_pylist()
    hubs = [{p["generator_layer"] + str(p["generator_unit"]) for p in pairs if p["condition"] == "trained" and p["model"] == name}
            for name in ("models/encoder", "random:mirage-toy-clip:1")]
    assert m["rosetta_units"] == len(hubs[0] & hubs[1]) <= min(map(len, hubs))


@pytest.mark.slow
def test_chunks_computed_on_dask_workers_have_the_local_bytes(done, project):
    """runner.kind dask: each chunk a task on a LocalCluster worker (2
    processes), the chunk table byte-identical to the local runner's."""
    import shutil

    from mirage.data.params import write_overrides

    write_overrides(project / "params.yaml", {"runner.kind": "dask", "runner.n_workers": 2})
    shutil.rmtree(project / "data/concepts")
    shutil.rmtree(project / ".mirage/pool/concepts", ignore_errors=True)
    result = _stage(project)
    assert result["computed"] == 2

    def files(root):
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*.parquet")} | \
               {"manifest.json": (root / "manifest.json").read_bytes()}

    assert files(project / "data/concepts/chunks") == files(done / "data/concepts/chunks")
    assert (project / "data/concepts/measures.json").read_bytes() == (done / "data/concepts/measures.json").read_bytes()


def test_a_dit_generators_transformer_blocks_are_units(tmp_path):
    """A DiT (random weights, mirage.random_models' tiny one): each transformer
    block's tokens on the latent patch grid, the null class, VAE latents."""
    from conftest import ROOT

    from mirage.data.params import Concepts
    from mirage.random_models import save_dit
    from tasks.concepts import chunk_moments, combined, load_models

    dit = save_dit(tmp_path / "dit")
    models = load_models(Concepts(grid=4), str(dit), [str(ROOT / "models/encoder")], torch.device("cpu"))
    assert models.generator.layers == [("transformer_blocks.0", 16), ("transformer_blocks.1", 16)]
    rng = np.random.default_rng(0)
    images = [(f"k{i}", rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for i in range(6)]
    sets = chunk_moments(models, images, 4)
    r = combined([sets], str(ROOT / "models/encoder"))["trained"].correlation()
    assert r.shape == (32, 2048) and np.isfinite(r).all() and np.abs(r).max() > 0


def test_concept_patches_are_the_matched_units_z_scored_and_batch_independent(done):
    """features.patch_backbone: concepts: one channel per unit of the trained
    best-buddy pairs (generator's, then encoder's), z-scored with the stage's
    per-unit moments; an image's features do not depend on its batch; the
    random-weights baseline takes the random twins' own pairs."""
    import pyarrow.parquet as pq

    from mirage.models.encoders import load_encoder
    from mirage.models.fingerprint import encoder_spec
    from mirage.models.patch_backbones import load_patch_backbone

    encoder = load_encoder(encoder_spec(str(done / "models/encoder")), torch.device("cpu"))
    generator = str(done / "models/generator")
    pairs = pq.read_table(done / "data/concepts/pairs.parquet").to_pylist()

    def units(condition, side):
        return {(p[f"{side}_layer"], p[f"{side}_unit"]) for p in pairs
                if p["condition"] == condition and p["model"] == "models/encoder"}

    both = load_patch_backbone("concepts", encoder, generator, concepts=done / "data/concepts")
    assert both.channels == len(units("trained", "generator")) + len(units("trained", "encoder")) > 0
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    feats, grid = both.patches(images)
    assert grid == (8, 8) and feats.shape == (3, 64, both.channels)  # concepts.grid 8
    alone, _ = both.patches(images[1:2])
    assert np.abs(alone[0] - feats[1]).max() < 1e-4
    # z-scored with the generated images' moments: a generated image's channels are about standard
    assert abs(float(feats.mean())) < 3 and 0.05 < float(feats.std()) < 20
    encoder_only = load_patch_backbone("concepts:encoder:4", encoder, generator, concepts=done / "data/concepts")
    assert encoder_only.channels == len(units("trained", "encoder")) and encoder_only.patches(images)[1] == (4, 4)
    random = load_patch_backbone("concepts", encoder, generator, random_seed=0, concepts=done / "data/concepts")
    assert random.channels == len(units("random", "generator")) + len(units("random", "encoder"))
    assert random.identity != both.identity
    with pytest.raises(ValueError, match="features.patch_backbone.*run the concepts stage"):
        load_patch_backbone("concepts", encoder, generator, concepts=done / "data/nothing")
