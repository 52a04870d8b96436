"""Patch backbones: where discovery's patch features come from (`features.patch_backbone`).

- `encoder` / `encoder:keys` / `encoder:tokens`: the encoder's own last-block
  attention keys (TokenCut's choice) or its final patch tokens;
- `unet:MODULE:TIMESTEP[:NOISE_SEED]`: one module of the toy generator's UNet
  on the image noised to TIMESTEP, no class (DDAE-style);
- `concepts[:SIDES[:GRID]]`: only the units stage concepts matched (the
  trained best-buddy pairs of `features.encoder` in data/concepts/pairs.parquet),
  the generator's (`generator`), the encoder's (`encoder`) or both (`both`, the
  default), each map on a GRID x GRID grid (default: concepts.grid) and
  z-scored with its unit's mean and std over the generated images.

Each comes with its random-weight baseline (`random_seed`): the same
architecture with random weights (for `concepts`: the pairs the same
procedure found between the random-weight twins).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from mirage.models.devices import MODEL_BUILD, TorchRNG
from mirage.models.encoders import ImageEncoder, default_device, load_encoder, random_twin
from mirage.models.unit_maps import EncoderUnits, GeneratorUnits

SIDES = ("both", "generator", "encoder")
PAIRS_FILE = "pairs.parquet"  # stage concepts' best-buddy pairs, in its output directory


def load_toy_pipeline(path: str, device: torch.device | None = None):
    """The toy diffusers pipeline saved at `path` (its UNet is a patch backbone)."""
    from mirage.models.generators import load_generator as load

    gen = load(path, str(device or default_device()))
    if gen.kind != "toy":
        raise ValueError(f"generator {path!r}: a UNet patch backbone needs the toy pipeline, not {gen.kind}")
    return gen.pipe


class EncoderPatches:
    """Patch features from the encoder itself: its last-block attention keys
    (`keys`, TokenCut's choice) or its final patch tokens (`tokens`)."""

    def __init__(self, encoder: ImageEncoder, mode: str = "keys", tome_r: int | tuple = 0):
        if mode not in ("keys", "tokens"):
            raise ValueError(f"features.patch_backbone: encoder:{mode} is neither encoder:keys nor encoder:tokens")
        self.encoder = encoder
        self.mode = mode
        self.tome_r = tome_r  # tokens merged per block, mapped back to the grid

    def patches(self, images: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
        """uint8 B x H x W x 3 -> float32 B x (gh * gw) x C and the grid (gh, gw)."""
        with torch.inference_mode():
            _, feats = self.encoder.forward(self.encoder.prepare(images), self.mode, self.tome_r)
        return feats.cpu().numpy(), self.encoder.patch_grid


class DiffusionActivations:
    """Patch features = one diffusers UNet module's activations for the image
    noised to a small timestep, with the "no class" label (DDAE-style).  The
    noise is the same fixed draw for every image, so an image's features do not
    depend on its batch.  On the toy world, the first down block at full
    resolution beats the toy CLIP's keys by far (benchmarks/discovery_backbones.py)."""

    def __init__(self, unet, scheduler_config, null_class: int, module: str, timestep: int, noise_seed: int):
        from diffusers import DDPMScheduler

        self.unet = unet.eval()
        self.scheduler = DDPMScheduler.from_config(scheduler_config)
        self.null_class = null_class
        try:
            self.module = unet.get_submodule(module)
        except AttributeError:
            raise ValueError(f"features.patch_backbone: the UNet has no module {module!r}") from None
        self.timestep = timestep
        self.noise_seed = noise_seed

    def patches(self, images: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
        captured: list[torch.Tensor] = []
        handle = self.module.register_forward_hook(
            lambda _m, _i, out: captured.append(out[0] if isinstance(out, tuple) else out)
        )
        device = self.unet.device
        x0 = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1
        noise = torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(self.noise_seed)).to(device)
        t = torch.full((len(x0),), self.timestep, dtype=torch.long, device=device)
        labels = torch.full((len(x0),), self.null_class, device=device)
        try:
            with torch.inference_mode():
                self.unet(self.scheduler.add_noise(x0, noise.expand_as(x0), t), t, class_labels=labels)
        finally:
            handle.remove()
        f = captured[-1]
        b, c, h, w = f.shape
        return f.permute(0, 2, 3, 1).reshape(b, h * w, c).float().cpu().numpy(), (h, w)


class Backbone(NamedTuple):
    """A parsed `features.patch_backbone`."""

    kind: str  # encoder, unet or concepts
    part: str  # the encoder's mode (keys, tokens), the UNet's module, or the concepts' sides
    timestep: int = 0  # unet
    seed: int = 0  # unet: the noise draw
    grid: int = 0  # concepts: the maps' grid (0: concepts.grid, as the stage measured them)


def parse_patch_backbone(spec: str) -> Backbone:
    """`encoder` / `encoder:keys` / `encoder:tokens`, `unet:MODULE:TIMESTEP[:NOISE_SEED]`
    or `concepts[:SIDES[:GRID]]`.  Raises ValueError naming features.patch_backbone."""
    kind, _, rest = spec.partition(":")
    if kind == "encoder" and rest in ("", "keys", "tokens"):
        return Backbone("encoder", rest or "keys")
    parts = rest.split(":")
    if kind == "unet" and len(parts) in (2, 3) and all(p.lstrip("-").isdigit() for p in parts[1:]):
        return Backbone("unet", parts[0], int(parts[1]), int(parts[2]) if len(parts) == 3 else 0)
    if kind == "concepts" and len(parts) <= 2 and (parts[0] or "both") in SIDES and (
            len(parts) < 2 or (parts[1].isdigit() and int(parts[1]) > 0)):
        return Backbone("concepts", parts[0] or "both", grid=int(parts[1]) if len(parts) == 2 else 0)
    raise ValueError(f"features.patch_backbone: {spec!r} is none of encoder:keys, encoder:tokens, "
                     "unet:MODULE:TIMESTEP[:SEED], concepts[:both|generator|encoder[:GRID]]")


def load_patch_backbone(spec: str, encoder: ImageEncoder, generator: str | None, random_seed: int | None = None,
                        concepts: str | Path | None = None):
    """The backbone `spec` names (module docstring); `concepts`: stage concepts'
    output directory (for `concepts`).  With `random_seed`, the same
    architecture with random weights: the baseline that learned features must beat."""
    with MODEL_BUILD:
        return _load_patch_backbone(spec, encoder, generator, random_seed, concepts)


def _load_patch_backbone(spec: str, encoder: ImageEncoder, generator: str | None, random_seed: int | None,
                         concepts: str | Path | None):
    kind, module, timestep, seed, grid = parse_patch_backbone(spec)
    if kind == "concepts":
        if concepts is None or generator is None:
            raise ValueError("features.patch_backbone: a concepts backbone needs the generator and stage concepts' output")
        return ConceptPatches(Path(concepts) / PAIRS_FILE, module, grid, encoder, generator, random=random_seed is not None)
    if kind == "encoder":
        if random_seed is not None:
            encoder = load_encoder(random_twin(encoder.name, random_seed), encoder.device)
        return EncoderPatches(encoder, module)
    if generator is None:
        raise ValueError("features.patch_backbone: a unet backbone needs the generator")
    pipe = load_toy_pipeline(generator, encoder.device)
    unet = pipe.unet
    if random_seed is not None:
        from diffusers import UNet2DModel

        with TorchRNG(random_seed):
            unet = UNet2DModel.from_config(unet.config).to(encoder.device)
    return DiffusionActivations(unet, pipe.scheduler.config, pipe.null_class, module, timestep, seed)


def backbone_input_size(backbone) -> int:
    """The square image size a patch backbone takes."""
    if isinstance(backbone, EncoderPatches):
        return backbone.encoder.image_size
    if isinstance(backbone, ConceptPatches):
        return backbone.input_size
    return int(backbone.unet.config.sample_size)


class ConceptPatches:
    """Patch features from the matched units only: the units of stage
    concepts' best-buddy pairs (`trained`: between the configured models;
    `random`: between their random-weight twins, the baseline), their maps on
    a grid x grid grid, each z-scored with its unit's mean and std over the
    generated images as the stage measured them (fixed numbers: an image's
    features never depend on its batch).  Channels: the generator's units,
    then the encoder's, each sorted by (layer, unit)."""

    def __init__(self, pairs: Path, sides: str, grid: int, encoder: ImageEncoder, generator: str, random: bool = False):
        import pyarrow.parquet as pq

        if not pairs.is_file():
            raise ValueError(f"features.patch_backbone: concepts needs stage concepts' {pairs} (run the concepts stage)")
        table = pq.read_table(pairs)
        recipe = json.loads((table.schema.metadata or {}).get(b"mirage", b"{}"))
        if not recipe:
            raise ValueError(f"features.patch_backbone: {pairs} has no recipe (written by an older concepts stage: rerun it)")
        condition = "random" if random else "trained"
        rows = [r for r in table.to_pylist() if r["condition"] == condition and r["model"] == recipe["encoder"]]
        if not rows:
            raise ValueError(f"features.patch_backbone: concepts: stage concepts found no {condition} best-buddy pairs "
                             f"for {recipe['encoder']!r} in {pairs} (lower concepts.min_corr or use another backbone)")
        self.sides, self.grid = sides, grid or int(recipe["grid"])
        self.identity = hashlib.sha256(json.dumps(
            [sides, self.grid, recipe, sorted((r["generator_layer"], r["generator_unit"], r["encoder_layer"],
                                               r["encoder_unit"], r["generator_mean"], r["generator_std"],
                                               r["encoder_mean"], r["encoder_std"]) for r in rows)]).encode()).hexdigest()[:16]
        twin = recipe["random_seed"] if random else None
        device = encoder.device
        self.parts: list[tuple[object, list[int], torch.Tensor, torch.Tensor]] = []  # (units, columns, mean, std)
        if sides in ("both", "generator"):
            units = sorted({(r["generator_layer"], r["generator_unit"]): (r["generator_mean"], r["generator_std"])
                            for r in rows}.items())
            layers = tuple(sorted({layer for (layer, _), _ in units}))
            self.generator = GeneratorUnits(generator, layers, int(recipe["timestep"]), int(recipe["noise_seed"]),
                                            self.grid, device, random_seed=twin)
            self.parts.append(self._part(self.generator, units))
        if sides in ("both", "encoder"):
            units = sorted({(r["encoder_layer"], r["encoder_unit"]): (r["encoder_mean"], r["encoder_std"])
                            for r in rows}.items(), key=lambda u: (_block(u[0][0]), u[0][1]))
            if random:
                encoder = load_encoder(random_twin(encoder.name, twin), device)
            self.parts.append(self._part(EncoderUnits(encoder, tuple(sorted({_block(l) for (l, _), _ in units})), self.grid),
                                         units))
        self.input_size = self.parts[0][0].size if sides != "encoder" else encoder.image_size

    @staticmethod
    def _part(units, chosen):
        offsets, start = {}, 0
        for name, n in units.layers:
            offsets[name] = start
            start += n
        columns = [offsets[layer] + unit for (layer, unit), _ in chosen]
        mean = torch.tensor([m for _, (m, _) in chosen], dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor([max(s, 1e-6) for _, (_, s) in chosen], dtype=torch.float32).view(1, -1, 1, 1)
        return units, columns, mean, std

    @property
    def channels(self) -> int:
        return sum(len(columns) for _, columns, _, _ in self.parts)

    def patches(self, images: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
        """uint8 B x H x W x 3 -> float32 B x (grid * grid) x channels and the grid."""
        maps = [(units.maps(images)[:, columns].cpu() - mean) / std for units, columns, mean, std in self.parts]
        x = torch.cat(maps, 1)
        b, c, h, w = x.shape
        return x.permute(0, 2, 3, 1).reshape(b, h * w, c).numpy(), (h, w)


def _block(layer: str) -> int:
    """`block7.mlp` -> 7 (an encoder unit's layer, as stage concepts names it)."""
    return int(layer.removeprefix("block").partition(".")[0])
