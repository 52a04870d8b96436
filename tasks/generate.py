"""Sample images from a diffusion pipeline, one recorded seed per item."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class GenerationItem:
    key: str
    prompt: str
    class_name: str
    seed: int


def item_seed(base_seed: int, class_name: str, index: int) -> int:
    """A 63-bit seed determined by (base seed, class, index) alone, so an item's
    image does not depend on which other items are generated with it."""
    from mirage.store import item_key

    return int(item_key("seed", base_seed, class_name, index)[:15], 16)


def generate_batch(pipe, items: list[GenerationItem], steps: int, guidance: float) -> np.ndarray:
    """uint8 N x H x W x 3 for the items, in order."""
    names = list(pipe.config.class_names)
    labels = [names.index(it.class_name) for it in items]
    generators = [torch.Generator().manual_seed(it.seed) for it in items]
    return pipe(labels, generators, num_inference_steps=steps, guidance_scale=guidance)
