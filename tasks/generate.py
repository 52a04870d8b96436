"""What to generate: one item per (prompt template, class, index), one seed each."""
from __future__ import annotations

from mirage.generators import GenerationItem
from mirage.store import item_key

VERSION = 3  # bump when sampling changes: it is part of every image's key (3: guidance as two passes)


def item_seed(base_seed: int, prompt: str, index: int) -> int:
    """A 63-bit seed determined by (base seed, prompt, index) alone, so an item's
    image does not depend on which other items are generated with it, and
    adding templates, classes or images leaves existing seeds alone."""
    return int(item_key("seed", base_seed, prompt, index)[:15], 16)


def plan(templates: tuple[str, ...], classes: tuple[str, ...], per_prompt: int, base_seed: int,
         determinants: tuple) -> list[GenerationItem]:
    """Every wanted item, in a stable order.  `determinants` (model, steps,
    guidance, size, dtype, batch size) go into each key with the prompt and the
    seed.  The batch size is one because every batch is padded to it and
    kernels round differently by batch shape."""
    items = []
    for template in templates:
        for class_name in classes:
            prompt = template.format(class_name)
            for i in range(per_prompt):
                seed = item_seed(base_seed, prompt, i)
                key = item_key("generate", VERSION, prompt, class_name, seed, *determinants)
                items.append(GenerationItem(key, prompt, class_name, seed))
    return items
