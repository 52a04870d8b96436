"""TokenCut: one object per image by a normalized cut on patch features.

Nodes are patches; A_ij = 1 if cos(f_i, f_j) >= tau else eps.  The generalized
problem (D - A) x = lambda D x is solved through the symmetric normalized
matrix D^-1/2 A D^-1/2 (same eigenvectors after rescaling by D^-1/2), which is
symmetric, so a standard or sparse symmetric solver applies.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage
from scipy.sparse.linalg import eigsh

from mirage.images import mask_to_box
from mirage.models import Encoder

DENSE_MAX_NODES = 512  # below this a dense eigh is faster than ARPACK


@dataclass(frozen=True)
class Cut:
    patch_mask: np.ndarray  # bool gh x gw
    eigenvalue: float       # second-smallest generalized eigenvalue (0..1, lower = cleaner cut)


def second_eigenvector(features: np.ndarray, tau: float, eps: float) -> tuple[np.ndarray, float]:
    """features: N x C.  Returns the generalized Fiedler vector x (N,) with a
    deterministic sign (its largest-magnitude entry positive) and its eigenvalue."""
    f = features.astype(np.float64)
    f /= np.linalg.norm(f, axis=1, keepdims=True).clip(1e-12)
    affinity = np.where(f @ f.T >= tau, 1.0, eps)
    d_inv_sqrt = 1.0 / np.sqrt(affinity.sum(1))
    normalized = affinity * d_inv_sqrt[:, None] * d_inv_sqrt[None, :]
    n = len(f)
    if n <= DENSE_MAX_NODES:
        values, vectors = np.linalg.eigh(normalized)
        mu, v = values[-2], vectors[:, -2]
    else:  # two largest of D^-1/2 A D^-1/2 <=> two smallest of the normalized Laplacian
        values, vectors = eigsh(normalized, k=2, which="LA", v0=np.ones(n))
        order = np.argsort(values)
        mu, v = values[order[0]], vectors[:, order[0]]
    x = v * d_inv_sqrt
    if x[np.argmax(np.abs(x))] < 0:
        x = -x
    return x, float(1.0 - mu)


def tokencut(features: np.ndarray, grid: tuple[int, int], tau: float, eps: float) -> Cut:
    """The foreground: patches above the vector's mean on the seed's side (the
    seed is the patch with the largest |x|), restricted to the seed's 4-connected component."""
    x, value = second_eigenvector(features, tau, eps)
    seed = int(np.argmax(np.abs(x)))  # x[seed] > 0 after the sign fix, so the seed is above the mean
    side = (x > x.mean()).reshape(grid)
    labels, _ = ndimage.label(side)
    return Cut(patch_mask=labels == labels.flat[seed], eigenvalue=value)


def upsample_mask(patch_mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """Patch grid mask -> pixel mask (nearest; each patch covers its pixel block)."""
    gh, gw = patch_mask.shape
    rows = (np.arange(height) * gh) // height
    cols = (np.arange(width) * gw) // width
    return patch_mask[rows[:, None], cols[None, :]]


def cut_to_object(cut: Cut, height: int, width: int) -> tuple[np.ndarray, list[float]]:
    """Pixel mask and its (x, y, w, h) box."""
    mask = upsample_mask(cut.patch_mask, height, width)
    return mask, mask_to_box(mask)


def zero_shot(encoder: Encoder, images: np.ndarray, boxes: list[list[float]], prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Class index and probability for the crop of each box (x, y, w, h px).
    images: uint8 N x H x W x 3."""
    crops = []
    for img, (x, y, w, h) in zip(images, boxes):
        x0, y0 = int(x), int(y)
        x1, y1 = max(int(x + w), x0 + 1), max(int(y + h), y0 + 1)
        crop = torch.from_numpy(np.ascontiguousarray(img[y0:y1, x0:x1])).permute(2, 0, 1)[None].float()
        size = (encoder.image_size, encoder.image_size)
        crops.append(torch.nn.functional.interpolate(crop, size=size, mode="bilinear", align_corners=False)[0])
    batch = torch.stack(crops).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    with torch.inference_mode():
        img_emb, _ = encoder.encode_images(batch, keys=False)
        txt_emb = encoder.encode_text(prompts)
        probs = (encoder.model.logit_scale.exp() * img_emb @ txt_emb.T).softmax(-1).cpu().numpy()
    return probs.argmax(1), probs.max(1)
