"""Global embeddings and patch features of images."""
from __future__ import annotations

import numpy as np
import torch

from mirage.images import decode_png
from mirage.models import Encoder


def embed_images(encoder: Encoder, backbone, pngs: list[bytes]) -> tuple[np.ndarray, np.ndarray | None]:
    """float16 embeddings N x D (L2-normalised, from the encoder) and, when a
    patch backbone is given, its patch features flattened to N x (gh*gw*C)."""
    images = np.stack([decode_png(b) for b in pngs])
    with torch.inference_mode():
        emb, _ = encoder.encode_images(images, keys=False)
    emb16 = emb.float().cpu().numpy().astype(np.float16)
    if backbone is None:
        return emb16, None
    patches, _ = backbone.patches(images)
    return emb16, patches.reshape(len(images), -1).astype(np.float16)
