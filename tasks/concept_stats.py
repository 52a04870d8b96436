"""The statistics of stage concepts: streamed Pearson correlation, best buddies, mask scores.

Moments are float64: each unit's mean and centred sum of squares and the
centred cross-moment matrix of two models' units (units_A x units_B), summed
about the first batch's means (so Σx² − nμ² does not cancel) and combined
across disjoint row sets exactly (Chan et al.'s pairwise update).  A row is
one image at one position.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Moments:
    """Correlation-ready statistics of two models' units over n rows (image x position)."""

    n: int
    mean_a: np.ndarray  # float64 units_A
    mean_b: np.ndarray
    m2_a: np.ndarray    # float64 units_A: Σ (x - mean)²
    m2_b: np.ndarray
    cross: np.ndarray   # units_A x units_B: Σ (x_a - mean_a)(x_b - mean_b)

    @staticmethod
    def combine(parts: list["Moments"]) -> "Moments":
        """The moments of the union of disjoint row sets (exact: Chan et al.)."""
        parts = [p for p in parts if p.n]
        if not parts:
            raise ValueError("no rows to combine")
        n = sum(p.n for p in parts)
        mean_a = sum(p.n * p.mean_a for p in parts) / n
        mean_b = sum(p.n * p.mean_b for p in parts) / n
        m2_a = sum(p.m2_a + p.n * (p.mean_a - mean_a) ** 2 for p in parts)
        m2_b = sum(p.m2_b + p.n * (p.mean_b - mean_b) ** 2 for p in parts)
        cross = np.zeros((len(mean_a), len(mean_b)))
        for p in parts:
            cross += p.cross
            cross += p.n * np.outer(p.mean_a - mean_a, p.mean_b - mean_b)
        return Moments(n, mean_a, mean_b, m2_a, m2_b, cross)

    def correlation(self) -> np.ndarray:
        """Pearson r, float32 units_A x units_B; 0 for a unit that never varies."""
        sa, sb = np.sqrt(self.m2_a), np.sqrt(self.m2_b)
        denom = np.outer(sa, sb)
        with np.errstate(invalid="ignore", divide="ignore"):
            r = np.where(denom > 1e-12 * max(self.n, 1), self.cross / denom, 0.0)
        return np.clip(r, -1, 1).astype(np.float32)

    def std_a(self) -> np.ndarray:
        return np.sqrt(self.m2_a / max(self.n - 1, 1))

    def std_b(self) -> np.ndarray:
        return np.sqrt(self.m2_b / max(self.n - 1, 1))


class Accumulator:
    """Streaming Moments: float64 sums about a shift (the first batch's means)."""

    def __init__(self):
        self.n = 0

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """a: rows x units_A, b: rows x units_B (the same rows: image x position)."""
        if not len(a):
            return
        a, b = a.double(), b.double()
        if self.n == 0:
            self.shift_a, self.shift_b = a.mean(0), b.mean(0)
            self.s_a, self.s_b = torch.zeros_like(self.shift_a), torch.zeros_like(self.shift_b)
            self.q_a, self.q_b = torch.zeros_like(self.s_a), torch.zeros_like(self.s_b)
            self.sxy = torch.zeros(len(self.s_a), len(self.s_b), dtype=torch.float64, device=a.device)
        a, b = a - self.shift_a, b - self.shift_b
        self.n += len(a)
        self.s_a += a.sum(0)
        self.s_b += b.sum(0)
        self.q_a += (a * a).sum(0)
        self.q_b += (b * b).sum(0)
        self.sxy.addmm_(a.T, b)

    def moments(self, units_a: int, units_b: int) -> Moments:
        if self.n == 0:
            return Moments(0, np.zeros(units_a), np.zeros(units_b), np.zeros(units_a), np.zeros(units_b),
                           np.zeros((units_a, units_b)))
        n = self.n
        s_a, s_b = self.s_a.cpu().numpy(), self.s_b.cpu().numpy()
        return Moments(n, self.shift_a.cpu().numpy() + s_a / n, self.shift_b.cpu().numpy() + s_b / n,
                       self.q_a.cpu().numpy() - s_a * s_a / n, self.q_b.cpu().numpy() - s_b * s_b / n,
                       self.sxy.cpu().numpy() - np.outer(s_a, s_b) / n)


def moments_bytes(sets: dict[str, Moments]) -> bytes:
    """npz of every set's moments (cross as float32: r needs no more)."""
    arrays = {}
    for name, m in sets.items():
        arrays |= {f"{name}/n": np.array(m.n), f"{name}/mean_a": m.mean_a, f"{name}/mean_b": m.mean_b,
                   f"{name}/m2_a": m.m2_a, f"{name}/m2_b": m.m2_b, f"{name}/cross": m.cross.astype(np.float32)}
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def moments_from_bytes(blob: bytes) -> dict[str, Moments]:
    with np.load(io.BytesIO(blob)) as z:
        names = sorted({k.rsplit("/", 1)[0] for k in z.files})
        return {n: Moments(int(z[f"{n}/n"]), z[f"{n}/mean_a"], z[f"{n}/mean_b"], z[f"{n}/m2_a"], z[f"{n}/m2_b"],
                           z[f"{n}/cross"].astype(np.float64)) for n in names}


@dataclass(frozen=True)
class Buddies:
    a: np.ndarray  # generator columns
    b: np.ndarray  # encoder columns
    r: np.ndarray  # their correlation
    best: float    # mean over generator units of their best r (a threshold-free summary)

    def pairs(self) -> set[tuple[int, int]]:
        return set(zip(self.a.tolist(), self.b.tolist()))


def best_buddies(corr: np.ndarray, top_k: int, min_corr: float) -> Buddies:
    """(a, b) with b = a's best match and a among the top_k of b's column, r >= min_corr."""
    best_b = corr.argmax(1)
    k = min(top_k, corr.shape[0])
    top_a = np.argpartition(-corr, k - 1, axis=0)[:k]  # k x units_B, unordered
    a = np.arange(corr.shape[0])
    r = corr[a, best_b]
    keep = (top_a[:, best_b] == a).any(0) & (r >= min_corr)
    return Buddies(a[keep], best_b[keep], r[keep], float(r.mean()) if len(r) else 0.0)


def jaccard(x: set, y: set) -> float:
    return len(x & y) / len(x | y) if x | y else 1.0


AUROC_BINS = np.linspace(-8, 8, 321)  # z-units: the pair maps' scores, histogrammed for a streaming AUROC


@dataclass
class MaskScores:
    """Streaming mask IoU and AUROC of P pair maps against the foreground."""

    pairs: int
    iou_sum: np.ndarray = None
    images: int = 0
    pos: np.ndarray = None
    neg: np.ndarray = None

    def __post_init__(self):
        self.iou_sum = np.zeros(self.pairs)
        self.pos = np.zeros((self.pairs, len(AUROC_BINS) + 1))
        self.neg = np.zeros((self.pairs, len(AUROC_BINS) + 1))

    def add(self, pair_maps: torch.Tensor, fg: np.ndarray, top_q: float) -> None:
        """pair_maps: B x P x H x W (z-units), fg: bool B x H x W."""
        b, p, h, w = pair_maps.shape
        flat = pair_maps.reshape(b, p, h * w)
        k = max(1, math.ceil(top_q * h * w))
        thresh = flat.topk(k, dim=2).values[..., -1:]
        pred = (flat >= thresh).cpu().numpy()
        truth = fg.reshape(b, 1, h * w)
        inter = (pred & truth).sum(2)
        union = (pred | truth).sum(2)
        has = truth.any(2)[:, 0]
        self.iou_sum += (inter[has] / np.maximum(union[has], 1)).sum(0)
        self.images += int(has.sum())
        bins = np.digitize(flat.cpu().numpy(), AUROC_BINS)  # B x P x HW in 0..len(AUROC_BINS)
        for j in range(p):
            self.pos[j] += np.bincount(bins[:, j][truth[:, 0]], minlength=len(AUROC_BINS) + 1)
            self.neg[j] += np.bincount(bins[:, j][~truth[:, 0]], minlength=len(AUROC_BINS) + 1)

    def iou(self) -> np.ndarray:
        return self.iou_sum / max(self.images, 1)

    def auroc(self) -> np.ndarray:
        """P(score of a foreground pixel > a background one), ties counted half."""
        pos, neg = self.pos, self.neg
        below = np.cumsum(neg, axis=1) - neg  # negatives in lower bins
        total = pos.sum(1) * neg.sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(total > 0, (pos * (below + 0.5 * neg)).sum(1) / total, 0.5)
