"""Global embeddings and patch features of images, batch by batch."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from mirage.images import decode_png
from mirage.models import ImageEncoder


def decode_batch(ids: list[str], pngs: list[bytes], pool: ThreadPoolExecutor | None,
                 size: tuple[int, int] | None = None) -> tuple[np.ndarray | None, dict[int, str]]:
    """uint8 N x H x W x 3 of the images that decode, and index -> reason for
    those that do not (corrupt or empty bytes, another size than the rest):
    named, not skipped silently.  With `size` (h, w), images of another size
    are resized to it (imported images beside generated ones)."""
    def one(data: bytes):
        try:
            image = decode_png(data)
        except Exception as err:  # noqa: BLE001 - PIL raises several types
            return f"cannot be decoded: {type(err).__name__}: {err}" if data else "empty image (0 bytes)"
        return image if size is None or image.shape[:2] == tuple(size) else resize(image, size)

    images = list(pool.map(one, pngs)) if pool else [one(p) for p in pngs]
    bad = {i: im for i, im in enumerate(images) if isinstance(im, str)}
    good = [im for im in images if not isinstance(im, str)]
    if good:
        shapes = [im.shape for im in good]
        common = max(set(shapes), key=shapes.count)  # images of one table share a size
        for i, im in enumerate(images):
            if i not in bad and im.shape != common:
                bad[i] = f"size {im.shape[1]}x{im.shape[0]}, not the batch's {common[1]}x{common[0]}"
    kept = [im for i, im in enumerate(images) if i not in bad]
    return (np.stack(kept) if kept else None), bad


def resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 H x W x 3 -> size (h, w), bicubic (the aspect ratio follows the
    size: discovery maps its cuts back to the image's own pixels)."""
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BICUBIC))


def non_finite(*arrays: np.ndarray | None) -> list[int]:
    """Rows (axis 0) holding a NaN or an infinity in any of the arrays."""
    rows: set[int] = set()
    for a in arrays:
        if a is not None:
            rows |= set(np.flatnonzero(~np.isfinite(a.reshape(len(a), -1)).all(axis=1)).tolist())
    return sorted(rows)


def embed_batch(encoder: ImageEncoder, pixels: torch.Tensor, images: np.ndarray, patch_mode: str | None,
                unet_backbone=None) -> tuple[np.ndarray, np.ndarray | None]:
    """float16 embeddings N x D (L2-normalised) and, when asked, patch features
    flattened to N x (gh*gw*C): from the encoder's own forward (`keys` /
    `tokens`) or from a separate backbone (the toy UNet)."""
    with torch.inference_mode():
        emb, patches = encoder.forward(pixels, patch_mode if patch_mode in ("keys", "tokens") else None)
    emb16 = emb.cpu().numpy().astype(np.float16)
    if patch_mode == "unet":
        feats, _ = unet_backbone.patches(images)
        return emb16, feats.reshape(len(images), -1).astype(np.float16)
    if patches is None:
        return emb16, None
    return emb16, patches.cpu().numpy().reshape(len(images), -1).astype(np.float16)

