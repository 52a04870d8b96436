"""Image generators behind one interface: the toy pipeline, any diffusers
text-to-image pipeline (`AutoPipelineForText2Image`: SD 1.5, SD-Turbo,
SDXL-Turbo, ...) and class-conditional DiT (`DiTPipeline`), by local path or
hub id.

Determinism: item i's starting noise comes from its own `torch.Generator`, and
every batch is padded to the same size (copies of its last item, dropped
afterwards), so an image's bytes do not depend on which other items share its
batch — on CPU, matrix kernels pick their blocking by shape, and an unpadded
short batch rounds differently.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from mirage.models.devices import MODEL_BUILD, resolve_device, resolve_dtype


@dataclass(frozen=True)
class GenerationItem:
    key: str
    prompt: str
    class_name: str
    seed: int


@dataclass
class Generator:
    spec: str
    kind: Literal["toy", "text2image", "dit"]
    pipe: object
    device: torch.device
    dtype: torch.dtype

    def check_classes(self, classes: tuple[str, ...]) -> None:
        """Fail before any work if a class cannot be asked of this model."""
        if self.kind == "toy":
            known = list(self.pipe.config.class_names)
        elif self.kind == "dit":
            known = list(self.pipe.labels)
        else:
            return  # a text prompt can name anything
        unknown = [c for c in classes if c not in known and not (self.kind == "dit" and c.isdigit())]
        if unknown:
            raise ValueError(f"generate.classes: {unknown} not known to generator {self.spec} (it knows {known[:20]})")

    def native_size(self) -> int | None:
        """The only image size the model makes, or None if it takes height/width."""
        if self.kind == "toy":
            return int(self.pipe.unet.config.sample_size)
        if self.kind == "dit":
            return int(self.pipe.transformer.config.sample_size) * 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)
        return None

    def _class_id(self, name: str) -> int:
        if self.kind == "toy":
            return list(self.pipe.config.class_names).index(name)
        return int(self.pipe.labels[name]) if name in self.pipe.labels else int(name)

    def sample(self, items: list[GenerationItem], steps: int, guidance: float, size: int | None,
               pad_to: int) -> np.ndarray:
        """uint8 N x H x W x 3 for the items, in order."""
        padded = list(items) + [items[-1]] * max(pad_to - len(items), 0)
        generators = [torch.Generator().manual_seed(it.seed) for it in padded]
        if self.kind == "toy":
            out = self.pipe([self._class_id(it.class_name) for it in padded], generators,
                            num_inference_steps=steps, guidance_scale=guidance)
            return out[: len(items)]
        if self.kind == "dit":
            out = self.pipe(class_labels=[self._class_id(it.class_name) for it in padded], generator=generators,
                            num_inference_steps=steps, guidance_scale=guidance, output_type="np").images
        else:
            kwargs = {"height": size, "width": size} if size else {}
            out = self.pipe(prompt=[it.prompt for it in padded], generator=generators, num_inference_steps=steps,
                            guidance_scale=guidance, output_type="np", **kwargs).images
        out = np.asarray(out[: len(items)], dtype=np.float32)
        return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)


def _pipeline_class(spec: str) -> str:
    path = Path(spec)
    if path.exists():
        index = path / "model_index.json"
        if not index.exists():
            raise FileNotFoundError(f"generate.model {spec!r}: no model_index.json in that directory")
        return json.loads(index.read_text()).get("_class_name", "")
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.load_config(spec).get("_class_name", "")
    except Exception as err:  # noqa: BLE001 - hub errors come in many types; name the parameter
        raise FileNotFoundError(f"generate.model {spec!r}: neither a local directory nor a reachable hub id ({err})") from None


def load_generator(spec: str, device: str = "auto", dtype: str = "auto", tome_ratio: float = 0.0) -> Generator:
    """A generator by local path (saved with `save_pretrained`) or hub id;
    `tome_ratio` > 0: tomesd's Token Merging patched into its UNet."""
    with MODEL_BUILD:
        gen = _load_generator(spec, device, dtype)
    if tome_ratio:
        merge_tokens(gen, tome_ratio)
    return gen


def merge_tokens(gen: Generator, ratio: float) -> None:
    """tomesd (Bolya & Hoffman 2023) on a UNet with transformer blocks: merges
    `ratio` of the tokens in its full-resolution blocks.  ValueError naming
    generate.tome_ratio where it cannot apply (the toy UNet, DiT)."""
    unet = getattr(gen.pipe, "unet", None)
    has_blocks = unet is not None and any(type(m).__name__ == "BasicTransformerBlock" for m in unet.modules())
    if gen.kind != "text2image" or not has_blocks:
        raise ValueError(f"generate.tome_ratio: Token Merging needs a UNet with transformer blocks (SD 1.x/2.x); "
                         f"{gen.spec} is a {gen.kind} pipeline{' without them' if unet is not None else ''}: set it to 0")
    import tomesd

    tomesd.apply_patch(gen.pipe, ratio=ratio)


def _load_generator(spec: str, device: str, dtype: str) -> Generator:
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    cls = _pipeline_class(spec)
    if cls == "ToyPipeline":
        from mirage.models.toy_pipeline import ToyPipeline

        return Generator(spec, "toy", ToyPipeline.from_pretrained(spec).to(dev), dev, torch.float32)
    if cls == "DiTPipeline":
        from diffusers import DiTPipeline

        pipe, kind = DiTPipeline.from_pretrained(spec, dtype=dt), "dit"
    else:
        from diffusers import AutoPipelineForText2Image

        try:
            pipe, kind = AutoPipelineForText2Image.from_pretrained(spec, dtype=dt), "text2image"
        except ValueError as err:
            raise ValueError(f"generate.model {spec!r}: {cls} is not a text-to-image pipeline ({err})") from None
    pipe = pipe.to(dev)
    pipe.set_progress_bar_config(disable=True)  # the stage draws one bar for all batches
    return Generator(spec, kind, pipe, dev, dt)
