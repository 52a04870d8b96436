"""Global embeddings and patch features of images, batch by batch."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from mirage.images import decode_png
from mirage.models import ImageEncoder


def decode_batch(ids: list[str], pngs: list[bytes], pool: ThreadPoolExecutor | None) -> np.ndarray:
    """uint8 N x H x W x 3; an undecodable image is named, not skipped."""
    def one(pair):
        image_id, data = pair
        try:
            return decode_png(data)
        except Exception as err:  # noqa: BLE001 - PIL raises several types
            raise ValueError(f"image {image_id!r} cannot be decoded: {err}") from None

    pairs = list(zip(ids, pngs))
    images = list(pool.map(one, pairs)) if pool else [one(p) for p in pairs]
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise ValueError(f"images of one table must share a size, got {sorted(shapes)}")
    return np.stack(images)


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

