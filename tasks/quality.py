"""How close generated images are to real ones, on cached embeddings.

Fréchet distance and KID (clean-fid's `fid_from_feats` and `kernel_distance`),
precision/recall and density/coverage (prdc's k-NN manifolds), always at one
sample size N on both sides: FD's bias falls like 1/N, so only numbers at the
same N compare.  The reference sample is 2N images: half A is what generated
images are measured against, half B measured against A is the noise floor
(real vs real).  Intervals (95%, bootstrap, bias-shifted percentiles): FD
and KID over resamples of the generated sample; precision, recall, density
and coverage, each the mean of one term per item, over resamples of the
items they average over, the k-NN manifolds kept.
"""
from __future__ import annotations

import contextlib
import io

import numpy as np

from mirage.data.store import item_key

SAMPLE_SEED = 0  # which images are the sample: fixed, so a table that grows keeps its sample
MEASURES = ("fd", "kid", "precision", "recall", "density", "coverage")


def sample_order(keys: list[str], seed: int) -> list[int]:
    """Positions of `keys` in a seeded order that depends on each key alone,
    so a table that grows keeps its sample (a new key enters it or not)."""
    return sorted(range(len(keys)), key=lambda i: item_key("quality-sample", seed, keys[i]))


def reference_sample(table: str, n: int) -> list[tuple[str, str]]:
    """(key, id) of `n` images of a table, chosen by sample_order, listed in
    the table's order (the order it is read in)."""
    from mirage.data.store import read_table

    rows = read_table(table, columns=["key", "id"]).to_pylist()
    chosen = set(sample_order([r["key"] for r in rows], SAMPLE_SEED)[:n])
    return [(r["key"], r["id"]) for i, r in enumerate(rows) if i in chosen]


def frechet_distance(real: np.ndarray, fake: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2).  With more images than
    dimensions: clean-fid's `fid_from_feats` (scipy's sqrtm of the
    D x D product).  With fewer (a 768-d encoder, N 250; the bootstrap's
    resamples), the covariances have rank < D and the same trace comes exactly
    from the N x N matrix M M^T, M = X1 X2^T of the centred sets: S1 S2 and
    X1 X2^T X2 X1^T / c share their non-zero eigenvalues, so the trace of the
    square root is the sum of their square roots (tests/test_quality.py checks
    it against clean-fid), at a fraction of a D x D sqrtm."""
    real, fake = real.astype(np.float64), fake.astype(np.float64)
    if min(len(real), len(fake)) > real.shape[1]:
        from cleanfid.fid import fid_from_feats

        return float(fid_from_feats(real, fake))
    x1, x2 = real - real.mean(0), fake - fake.mean(0)
    c1, c2 = len(real) - 1, len(fake) - 1
    m = x1 @ x2.T
    eig = np.linalg.eigvalsh(m @ m.T / (c1 * c2))
    cross = np.sqrt(np.clip(eig, 0, None)).sum()
    diff = real.mean(0) - fake.mean(0)
    return float(diff @ diff + (x1 * x1).sum() / c1 + (x2 * x2).sum() / c2 - 2 * cross)


def kernel_distance(real: np.ndarray, fake: np.ndarray, seed: int) -> float:
    """KID (unbiased cubic-kernel MMD, averaged over 100 subsets of 1000 when
    a set is bigger; one pass when both sets are whole subsets, since every
    subset would then be the same items); clean-fid draws its subsets from
    NumPy's global generator: seeded here, put back."""
    from cleanfid.fid import kernel_distance as kid

    subsets = 1 if len(real) == len(fake) <= 1000 else 100
    state = np.random.get_state()
    np.random.seed(seed % 2**32)
    try:
        return float(kid(real.astype(np.float64), fake.astype(np.float64), num_subsets=subsets))
    finally:
        np.random.set_state(state)


def manifolds(real: np.ndarray, fake: np.ndarray, k: int) -> dict:
    """prdc's k-NN radii of both sets and their cross distances."""
    from prdc.prdc import compute_nearest_neighbour_distances, compute_pairwise_distance

    with contextlib.redirect_stdout(io.StringIO()):
        return {"real_r": compute_nearest_neighbour_distances(real, k),
                "fake_r": compute_nearest_neighbour_distances(fake, k),
                "d": compute_pairwise_distance(real, fake), "k": k}


def prdc_terms(m: dict) -> dict[str, np.ndarray]:
    """Each measure of prdc (Naeem et al. 2020) as the mean of one term per
    item: precision and density over the generated items, recall and
    coverage over the real ones."""
    d, real_r = m["d"], m["real_r"]
    inside = d < real_r[:, None]
    return {"precision": inside.any(axis=0), "recall": (d < m["fake_r"][None, :]).any(axis=1),
            "density": inside.sum(axis=0) / m["k"], "coverage": d.min(axis=1) < real_r}


OVER_REAL = ("recall", "coverage")  # their terms are per real item; the others' per generated item


def compare(real: np.ndarray, fake: np.ndarray, k: int, seed: int, bootstrap: int = 0) -> dict:
    """Every measure of `fake` against `real` (N x D each), with 95%
    bootstrap intervals over `fake` when `bootstrap` > 0."""
    real, fake = np.asarray(real, np.float32), np.asarray(fake, np.float32)
    terms = prdc_terms(manifolds(real, fake, k))
    out = {"n": len(fake), "fd": frechet_distance(real, fake), "kid": kernel_distance(real, fake, seed),
           **{name: float(t.mean()) for name, t in terms.items()}}
    if bootstrap:  # a resample of the items each measure averages over (the k-NN manifolds stay the whole sets')
        rng = np.random.default_rng(seed)
        draws = {name: [] for name in MEASURES}
        for b in range(bootstrap):
            idx = rng.integers(0, len(fake), len(fake))
            draws["fd"].append(frechet_distance(real, fake[idx]))
            draws["kid"].append(kernel_distance(real, fake[idx], seed + b + 1))
            real_idx = rng.integers(0, len(real), len(real))
            for name, t in terms.items():
                draws[name].append(float(t[real_idx if name in OVER_REAL else idx].mean()))
        # percentile intervals shifted by the bootstrap's bias (mean of the draws - the estimate): a resample
        # repeats images, which alone raises FD and KID (fewer distinct points), so their raw percentiles sit
        # above the estimate; precision, recall, density and coverage are means, their shift ~0
        top = {"precision": 1.0, "recall": 1.0, "coverage": 1.0}  # shares in [0, 1]; KID (unbiased) may be < 0
        out["ci95"] = {name: [float(np.clip(np.percentile(v, q) - (np.mean(v) - out[name]),
                                            -np.inf if name == "kid" else 0.0, top.get(name, np.inf)))
                              for q in (2.5, 97.5)] for name, v in draws.items()}
    return out


def distribution_quality(reference: np.ndarray, reference_classes: list[str | None], generated: np.ndarray,
                         generated_classes: list[str | None], n: int, k: int, seed: int, bootstrap: int,
                         classes: tuple[str, ...]) -> dict:
    """Generated vs reference half A at N = min(n, generated, reference / 2),
    the floor (half B vs A), and per class (N per class recorded).  Both sets
    come in sample order (sample_order): their first rows are the sample."""
    n = min(n, len(generated), len(reference) // 2)
    if n < k + 2:
        return {"n": n, "skipped": f"too few images for k={k} neighbours (generated {len(generated)}, "
                                   f"reference {len(reference)}: N = min(evaluate.quality_n, generated, reference/2))"}
    a, b = reference[0 : 2 * n : 2], reference[1 : 2 * n : 2]
    out = {**compare(a, generated[:n], k, seed, bootstrap), "floor": compare(a, b, k, seed), "k": k}
    per_class = {}
    for c in classes:
        ref_c = reference[[i for i, rc in enumerate(reference_classes) if rc == c]]
        gen_c = generated[[i for i, gc in enumerate(generated_classes) if gc == c]]
        nc = min(len(gen_c), len(ref_c))
        if nc >= k + 2:
            per_class[c] = compare(ref_c[:nc], gen_c[:nc], k, seed)
        else:
            per_class[c] = {"n": nc, "generated": len(gen_c), "reference": len(ref_c)}
    out["per_class"] = per_class
    return out


def scene_classes(table: str) -> dict[str, str | None]:
    """id -> the class of a scene's one object (None for a scene of several)."""
    from mirage.data.store import read_table

    rows = read_table(table, columns=["id", "objects"]).to_pylist()
    return {r["id"]: r["objects"][0]["class_name"] if len(r["objects"]) == 1 else None for r in rows}


def embeddings_by_id(features: str, ids: list[str] | None = None) -> tuple[list[str], np.ndarray]:
    """(ids, float32 N x D) of a features table's rows, in sample order
    (sample_order of the ids), only `ids` when given."""
    from mirage.data.store import read_table

    t = read_table(features, columns=["id", "embedding"])
    have = t.column("id").to_pylist()
    emb = t.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    emb = emb.astype(np.float32).reshape(len(have), -1)
    rows = [i for i, x in enumerate(have) if ids is None or x in ids]
    rows = [rows[j] for j in sample_order([have[i] for i in rows], SAMPLE_SEED)]
    return [have[i] for i in rows], emb[rows]


def generation_quality(images: str, features: str, reference: str, classes_of: dict[str, str | None],
                       classes: tuple[str, ...], n: int, k: int, seed: int, bootstrap: int) -> dict:
    """The generated images' embeddings (from `features`) against the
    reference sample's (`reference`, the features stage's sample of real
    images); `classes_of`: a reference image's class, where known."""
    from mirage.data.store import read_table

    gen = {r["id"]: r["class_name"] for r in read_table(images, columns=["id", "class_name"]).to_pylist()}
    gen_ids, gen_emb = embeddings_by_id(features, set(gen))
    ref_ids, ref_emb = embeddings_by_id(reference)
    q = distribution_quality(ref_emb, [classes_of.get(i) for i in ref_ids], gen_emb, [gen[i] for i in gen_ids],
                             n, k, seed, bootstrap, classes if classes_of else ())
    return {"generated": len(gen_ids), "reference_images": len(ref_ids), **q}


def quality_png(q: dict, title: str) -> bytes:
    """Bars of precision, recall, density and coverage: overall and per class
    (N on each), the real-vs-real floor as a grey tick; FD and KID written."""
    import io as _io

    from PIL import Image, ImageDraw, ImageFont

    font, small = ImageFont.load_default(size=13), ImageFont.load_default(size=11)
    groups = [("all", q)] + [(c, m) for c, m in q.get("per_class", {}).items()]
    measures = ("precision", "recall", "density", "coverage")
    colors = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40)]
    left, top, group_w, bar_w, plot_h = 50, 60, 150, 28, 260
    width = left + group_w * len(groups) + 30
    img = Image.new("RGB", (max(width, 520), top + plot_h + 70), "white")
    draw = ImageDraw.Draw(img)
    draw.text((10, 8), title, fill=(20, 20, 20), font=font)
    floor = q.get("floor", {})
    if "fd" not in q:
        draw.text((10, 28), q.get("skipped", "no distribution metrics"), fill=(60, 60, 60), font=small)
    else:
        draw.text((10, 28), f"N {q.get('n')}   FD {q.get('fd', float('nan')):.4f} (floor {floor.get('fd', float('nan')):.4f})"
              f"   KID {q.get('kid', float('nan')):.5f} (floor {floor.get('kid', float('nan')):.5f})",
                  fill=(60, 60, 60), font=small)
    hi = max([1.0] + [m.get(x, 0) for _, m in groups for x in measures] + [floor.get(x, 0) for x in measures])
    y_of = lambda v: top + plot_h - plot_h * min(v, hi) / hi  # noqa: E731
    for v in (0.0, 0.5, 1.0) + ((hi,) if hi > 1.0 else ()):
        draw.line([(left - 4, y_of(v)), (width - 20, y_of(v))], fill=(230, 230, 230))
        draw.text((8, y_of(v) - 6), f"{v:.1f}", fill=(90, 90, 90), font=small)
    for g, (name, m) in enumerate(groups):
        x0 = left + g * group_w + 10
        for j, measure in enumerate(measures):
            x = x0 + j * (bar_w + 4)
            if measure in m:
                draw.rectangle((x, y_of(m[measure]), x + bar_w, y_of(0)), fill=colors[j])
            if name == "all" and measure in floor:
                draw.line([(x - 2, y_of(floor[measure])), (x + bar_w + 2, y_of(floor[measure]))], fill=(90, 90, 90), width=3)
        draw.text((x0, top + plot_h + 6), f"{name} (N {m.get('n')})", fill=(20, 20, 20), font=small)
    for j, measure in enumerate(measures):
        x = left + j * 110
        draw.rectangle((x, top + plot_h + 30, x + 12, top + plot_h + 42), fill=colors[j])
        draw.text((x + 16, top + plot_h + 29), measure, fill=(20, 20, 20), font=small)
    draw.text((left + 4 * 110, top + plot_h + 29), "grey: real vs real floor", fill=(90, 90, 90), font=small)
    out = _io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()
