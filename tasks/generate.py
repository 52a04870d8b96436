"""What to generate: one item per (prompt template, class, index), one seed each."""
from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from mirage.data import schema
from mirage.data.images import encode_png
from mirage.data.params import Generate
from mirage.data.store import item_key
from mirage.models.fingerprint import model_fingerprint
from mirage.models.generators import GenerationItem, Generator, load_generator

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


def sample(gen: Generator, model_id: str, cfg: Generate, size: int | None, items: list[GenerationItem]) -> pa.Table:
    images = gen.sample(items, cfg.steps, cfg.guidance, size, pad_to=cfg.batch_size)
    rows = [
        {"key": it.key, "id": f"g-{it.key[:16]}", "image": encode_png(img), "width": img.shape[1],
         "height": img.shape[0], "prompt": it.prompt, "class_name": it.class_name, "seed": it.seed,
         "model": model_id, "steps": cfg.steps, "guidance": cfg.guidance}
        for it, img in zip(items, images)
    ]
    return pa.Table.from_pylist(rows, schema=schema.IMAGES)


def image_size(cfg: Generate, gen: Generator) -> int | None:
    native = gen.native_size()
    if native and cfg.image_size and cfg.image_size != native:
        raise ValueError(f"generate.image_size: {cfg.image_size}, but {cfg.model} only makes {native} px images")
    return cfg.image_size or native


@dataclass(frozen=True)
class GenerateJob:
    """The generator's batches, wherever they run (mirage/run/runner.py)."""

    cfg: Generate
    model_id: str = ""  # from describe(): filled in before batches are sent
    size: int | None = None

    @property
    def batch_param(self) -> tuple[str, int]:
        """The key that sizes a batch (named when one runs out of memory)."""
        return "generate.batch_size", self.cfg.batch_size

    def load_key(self) -> tuple:
        return ("generate", self.cfg.model, self.cfg.device, self.cfg.dtype, self.cfg.tome_ratio)

    def load(self) -> Generator:
        return load_generator(self.cfg.model, self.cfg.device, self.cfg.dtype, self.cfg.tome_ratio)

    def describe(self, gen: Generator) -> dict:
        gen.check_classes(self.cfg.classes)
        return {"model": model_fingerprint(self.cfg.model),  # after loading: a hub model's revision is then cached
                "size": image_size(self.cfg, gen), "device": str(gen.device),
                "dtype": str(gen.dtype).removeprefix("torch.")}

    def prepare(self, gen: Generator, items: list[GenerationItem]) -> list[GenerationItem]:
        return items

    def compute(self, gen: Generator, items: list[GenerationItem]) -> pa.Table:
        return sample(gen, self.model_id, self.cfg, self.size, items)
