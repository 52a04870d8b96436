"""One factory for every model, by name or path (open_clip's way).

Encoders: `local-dir:PATH` (a saved open_clip model: open_clip_config.json +
open_clip_model.safetensors, the toy encoder's layout), `ARCH:TAG` or
`ARCH:/path/weights.safetensors` (open_clip architecture + pretrained tag or
checkpoint), or `random:ARCH:SEED` (the architecture with random weights, the
baseline that learned features must beat).  The toy architectures are JSON
configs in mirage/model_configs/, registered with open_clip on import.

Generators: a directory saved with diffusers' `save_pretrained`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(CONFIG_DIR)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class Encoder:
    """An open_clip model with the bits mirage needs: pixels in, features out."""

    name: str
    model: torch.nn.Module
    tokenizer: object
    image_size: int
    mean: torch.Tensor
    std: torch.Tensor
    device: torch.device

    @property
    def patch_grid(self) -> tuple[int, int]:
        return tuple(self.model.visual.grid_size)

    @property
    def embed_dim(self) -> int:
        return int(self.model.visual.output_dim)

    @property
    def key_dim(self) -> int:
        return int(self.model.visual.transformer.resblocks[-1].attn.embed_dim)

    def preprocess(self, images: np.ndarray) -> torch.Tensor:
        """uint8 B x H x W x 3 -> normalised float B x 3 x S x S (bicubic resize if needed)."""
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device).permute(0, 3, 1, 2).float() / 255
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False).clamp(0, 1)
        return (x - self.mean) / self.std

    def encode_images(self, images: np.ndarray, keys: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns L2-normalised embeddings B x D and, if asked, the last block's
        attention keys for the patch tokens, B x (gh * gw) x C (class token dropped)."""
        block = self.model.visual.transformer.resblocks[-1]
        captured: list[torch.Tensor] = []
        handle = block.ln_1.register_forward_hook(lambda _m, _i, out: captured.append(out)) if keys else None
        try:
            emb = self.model.encode_image(self.preprocess(images), normalize=True)
        finally:
            if handle:
                handle.remove()
        if not keys:
            return emb, None
        x = captured[-1]  # B x (1 + gh*gw) x C, batch-first in open_clip 3
        c = block.attn.embed_dim
        k = F.linear(x, block.attn.in_proj_weight[c : 2 * c], block.attn.in_proj_bias[c : 2 * c])
        return emb, k[:, 1:]

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """L2-normalised text embeddings, len(texts) x D."""
        return self.model.encode_text(self.tokenizer(texts).to(self.device), normalize=True)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_encoder(name: str, device: torch.device | None = None) -> Encoder:
    device = device or default_device()
    if name.startswith("random:"):
        _, arch, seed = name.split(":")
        torch.manual_seed(int(seed))
        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=None, device=device)
        tokenizer = open_clip.get_tokenizer(arch)
    elif name.startswith("local-dir:"):
        path = Path(name.removeprefix("local-dir:"))
        if not (path / "open_clip_config.json").exists():
            raise FileNotFoundError(f"encoder {name!r}: {path}/open_clip_config.json not found")
        model, _, preprocess = open_clip.create_model_and_transforms(name, device=device)
        tokenizer = open_clip.get_tokenizer(name)
    else:
        arch, _, pretrained = name.partition(":")
        if arch not in open_clip.list_models():
            raise ValueError(f"encoder {name!r}: unknown open_clip architecture {arch!r}")
        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=pretrained or None, device=device)
        tokenizer = open_clip.get_tokenizer(arch)
    model.eval()
    norm = next(t for t in preprocess.transforms if hasattr(t, "mean"))
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    shape = (1, 3, 1, 1)
    return Encoder(
        name=name,
        model=model,
        tokenizer=tokenizer,
        image_size=int(size),
        mean=torch.tensor(norm.mean, device=device).view(shape),
        std=torch.tensor(norm.std, device=device).view(shape),
        device=device,
    )


def save_encoder(model: torch.nn.Module, arch: str, out: Path) -> None:
    """Save in open_clip's local-dir layout (loadable as `local-dir:OUT`)."""
    from safetensors.torch import save_file

    cfg = open_clip.get_model_config(arch)
    out.mkdir(parents=True, exist_ok=True)
    (out / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": cfg, "preprocess_cfg": {"mean": list(OPENAI_MEAN), "std": list(OPENAI_STD)}}, indent=2))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "open_clip_model.safetensors"))


def load_generator(path: str, device: torch.device | None = None):
    """A diffusers pipeline saved with save_pretrained (the toy ToyPipeline)."""
    from mirage.pipelines import ToyPipeline

    index = Path(path) / "model_index.json"
    if not index.exists():
        raise FileNotFoundError(f"generator {path!r}: no model_index.json (run stage train_generator)")
    if json.loads(index.read_text()).get("_class_name") != "ToyPipeline":
        raise ValueError(f"generator {path!r}: only the toy pipeline is supported in this version")
    return ToyPipeline.from_pretrained(path).to(device or default_device())


class EncoderKeys:
    """Patch features = the encoder's last-block attention keys (TokenCut's choice)."""

    def __init__(self, encoder: Encoder):
        self.encoder = encoder

    def patches(self, images: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
        """uint8 B x H x W x 3 -> float32 B x (gh * gw) x C and the grid (gh, gw)."""
        with torch.inference_mode():
            _, keys = self.encoder.encode_images(images)
        return keys.float().cpu().numpy(), self.encoder.patch_grid


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


def load_patch_backbone(spec: str, encoder: Encoder, generator: str | None, random_seed: int | None = None):
    """`encoder` (the encoder's keys) or `unet:MODULE:TIMESTEP[:NOISE_SEED]` (the
    generator's UNet).  With `random_seed`, the same architecture with random
    weights: the baseline that learned features must beat."""
    if spec == "encoder":
        if random_seed is None:
            return EncoderKeys(encoder)
        raise ValueError("a random-weight encoder baseline is built by load_encoder('random:ARCH:SEED')")
    kind, _, rest = spec.partition(":")
    if kind != "unet" or rest.count(":") not in (1, 2):
        raise ValueError(f"features.patch_backbone: {spec!r} is neither 'encoder' nor 'unet:MODULE:TIMESTEP[:SEED]'")
    if generator is None:
        raise ValueError("features.patch_backbone: a unet backbone needs the generator")
    module, timestep, *seed = rest.split(":")
    pipe = load_generator(generator, encoder.device)
    unet = pipe.unet
    if random_seed is not None:
        from diffusers import UNet2DModel

        torch.manual_seed(random_seed)
        unet = UNet2DModel.from_config(unet.config).to(encoder.device)
    return DiffusionActivations(unet, pipe.scheduler.config, pipe.null_class, module, int(timestep), int(seed[0]) if seed else 0)
