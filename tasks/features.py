"""Global embeddings and patch features (last-block attention keys) of images."""
from __future__ import annotations

import numpy as np
import torch

from mirage.images import decode_png
from mirage.models import Encoder


def embed_images(encoder: Encoder, pngs: list[bytes], patches: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """float16 embeddings N x D (L2-normalised) and, if asked, keys N x (gh*gw*C)."""
    images = np.stack([decode_png(b) for b in pngs])
    with torch.inference_mode():
        emb, keys = encoder.encode_images(images, keys=patches)
    emb16 = emb.float().cpu().numpy().astype(np.float16)
    if keys is None:
        return emb16, None
    return emb16, keys.float().cpu().numpy().reshape(len(images), -1).astype(np.float16)
