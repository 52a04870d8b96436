"""One factory for every model, by name or path (open_clip's way).

Encoders: `local-dir:PATH` (a saved open_clip model: open_clip_config.json +
open_clip_model.safetensors, the toy encoder's layout), `ARCH:TAG` or
`ARCH:/path/weights.safetensors` (open_clip architecture + pretrained tag or
checkpoint), or `random:ARCH:SEED` (the architecture with random weights, the
baseline that learned features must beat).  The toy architectures are JSON
configs in mirage/models/model_configs/, registered with open_clip on import.
`timm:NAME`, `timm:local-dir:PATH` and `timm:random:NAME:SEED` are the same
three forms for timm ViTs (DINO, DeiT, ...), image tower only.

Generators: mirage/models/generators.py.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

from mirage.models.devices import MODEL_BUILD, TorchRNG, resolve_device, resolve_dtype
from mirage.models.tome import merging

CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(CONFIG_DIR)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def resize_center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 H x W x 3: shortest side to `size` (PIL bicubic), then the centre size x size."""
    from PIL import Image

    h, w = image.shape[:2]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    resized = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BICUBIC))
    top, left = (nh - size) // 2, (nw - size) // 2
    return resized[top : top + size, left : left + size]


@dataclass
class ImageEncoder:
    """Pixels in, features out; the part every backend shares.

    `prepare` (uint8 images -> normalised CPU tensor) is thread-safe and runs in
    the features stage's background workers; `forward` runs the model on its
    device, under autocast on a GPU.  Subclasses say where the patch tokens and
    the last block's attention keys come from.
    """

    name: str
    model: torch.nn.Module
    image_size: int
    mean: torch.Tensor  # 1 x 3 x 1 x 1, on CPU
    std: torch.Tensor
    device: torch.device
    autocast_dtype: torch.dtype | None = None  # GPU only
    num_prefix_tokens = 1  # tokens before the patches (class token, registers)
    has_text = False  # a text tower: zero-shot naming, prompt alignment, search

    @property
    def patch_grid(self) -> tuple[int, int]:
        raise NotImplementedError

    @property
    def embed_dim(self) -> int:
        raise NotImplementedError

    def prepare(self, images: np.ndarray) -> torch.Tensor:
        """uint8 B x H x W x 3 -> normalised float B x 3 x S x S on CPU.

        Images of another size are resized as open_clip's and timm's eval
        transforms do (shortest side to S with PIL bicubic, centre crop):
        uint8 SIMD resizing, cheap enough to hide behind the model."""
        if images.shape[1:3] != (self.image_size, self.image_size):
            images = np.stack([resize_center_crop(im, self.image_size) for im in images])
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
        return x.div_(255).sub_(self.mean).div_(self.std).contiguous()

    def preprocess(self, images: np.ndarray) -> torch.Tensor:
        return self.prepare(images).to(self.device)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _hooks(self) -> tuple[torch.nn.Module, torch.nn.Module]:
        """(module whose output holds all tokens, module whose output feeds the last attention)."""
        raise NotImplementedError

    def _keys(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, patches: str | None = None,
                tome_r: int | tuple | list = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """L2-normalised float32 embeddings B x D and, if asked, patch features
        B x (gh * gw) x C: `keys` (the last block's attention keys, TokenCut's
        choice) or `tokens` (the final patch tokens); prefix tokens dropped.
        `tome_r`: tokens merged per block (mirage/models/tome.py); the patch
        features of merged tokens are mapped back to the grid."""
        if patches not in (None, "keys", "tokens"):
            raise ValueError(f"patch features {patches!r}: expected 'keys' or 'tokens'")
        captured: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        tokens_at, keys_at = self._hooks()
        module = tokens_at if patches == "tokens" else keys_at
        autocast = torch.autocast("cuda", dtype=self.autocast_dtype) if self.autocast_dtype else contextlib.nullcontext()
        with merging(self.model, tome_r, self.num_prefix_tokens, trace=patches is not None) as state:
            # the source is taken with the features: the last block's keys come before its own merge
            handle = module.register_forward_hook(
                lambda _m, _i, out: captured.append((out, state.source if state else None))) if patches else None
            try:
                with autocast:
                    emb = self._embed(x.to(self.device, non_blocking=True))
                    feats = None
                    if patches:
                        out, source = captured[-1]
                        feats = (self._keys(out) if patches == "keys" else out)[:, self.num_prefix_tokens :]
                        feats = state.to_grid(feats, source) if state else feats
            finally:
                if handle:
                    handle.remove()
        emb = F.normalize(emb.float(), dim=-1)
        return emb, None if feats is None else feats.float()

    def encode_images(self, images: np.ndarray, keys: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Embeddings and (if `keys`) last-block attention keys of uint8 images."""
        return self.forward(self.prepare(images), "keys" if keys else None)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        raise ValueError(f"encoder {self.name!r} has no text tower: zero-shot naming and search need an open_clip model")


@dataclass
class Encoder(ImageEncoder):
    """An open_clip model (image and text towers)."""

    tokenizer: object = None
    has_text = True

    @property
    def patch_grid(self) -> tuple[int, int]:
        return tuple(self.model.visual.grid_size)

    @property
    def embed_dim(self) -> int:
        return int(self.model.visual.output_dim)

    @property
    def key_dim(self) -> int:
        return int(self.model.visual.transformer.resblocks[-1].attn.embed_dim)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(x)

    def _hooks(self):
        return self.model.visual.transformer, self.model.visual.transformer.resblocks[-1].ln_1

    def _keys(self, x: torch.Tensor) -> torch.Tensor:
        attn = self.model.visual.transformer.resblocks[-1].attn  # B x T x C in, batch-first in open_clip 3
        c = attn.embed_dim
        return F.linear(x, attn.in_proj_weight[c : 2 * c], attn.in_proj_bias[c : 2 * c])

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """L2-normalised text embeddings, len(texts) x D."""
        return self.model.encode_text(self.tokenizer(texts).to(self.device), normalize=True)


@dataclass
class TimmEncoder(ImageEncoder):
    """A timm ViT (DINO, DeiT, ...): image tower only, pooled pre-logits as the embedding."""

    @property
    def num_prefix_tokens(self) -> int:
        return int(getattr(self.model, "num_prefix_tokens", 1))

    @property
    def patch_grid(self) -> tuple[int, int]:
        return tuple(self.model.patch_embed.grid_size)

    @property
    def embed_dim(self) -> int:
        return int(self.model.num_features)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)

    def _hooks(self):
        return self.model.norm, self.model.blocks[-1].attn.qkv

    def _keys(self, qkv: torch.Tensor) -> torch.Tensor:
        c = qkv.shape[-1] // 3
        return qkv[..., c : 2 * c]


def _autocast_dtype(dtype: str, device: torch.device) -> torch.dtype | None:
    if device.type != "cuda":
        return None
    dt = resolve_dtype(dtype, device)
    return None if dt == torch.float32 else dt


def default_device() -> torch.device:
    return resolve_device("auto")


def load_encoder(name: str, device: torch.device | None = None, dtype: str = "auto") -> ImageEncoder:
    """An encoder by spec (see the module doc); `timm:` selects the timm backend."""
    with MODEL_BUILD:
        return _load_encoder(name, device or default_device(), dtype)


def _load_encoder(name: str, device: torch.device, dtype: str) -> ImageEncoder:
    if name.startswith("timm:"):
        return _load_timm(name, device, dtype)
    if name.startswith("random:"):
        arch, seed = random_spec(name)
        with TorchRNG(seed):
            model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=None, device=device,
                                                                         load_weights=False)
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
        mean=torch.tensor(norm.mean).view(shape),
        std=torch.tensor(norm.std).view(shape),
        device=device,
        autocast_dtype=_autocast_dtype(dtype, device),
    )


def _load_timm(name: str, device: torch.device, dtype: str) -> TimmEncoder:
    """`timm:NAME[.TAG]` (pretrained from the hub), `timm:local-dir:PATH` (saved
    with timm's save_for_hf) or `timm:random:NAME:SEED`."""
    import timm

    rest = name.removeprefix("timm:")
    kwargs, seed = {}, None
    if rest.startswith("random:"):
        arch, seed = random_spec(rest)
        source, pretrained = arch, False
        if arch.startswith("local-dir:"):  # the saved model's architecture, with random weights
            config = json.loads((Path(arch.removeprefix("local-dir:")) / "config.json").read_text())
            source, kwargs = config["architecture"], config.get("model_args", {})
    elif rest.startswith("local-dir:"):
        path = Path(rest.removeprefix("local-dir:"))
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"encoder {name!r}: {path}/config.json not found")
        source, pretrained = rest, True
    else:
        source, pretrained = rest, True
    try:
        with TorchRNG(seed) if seed is not None else contextlib.nullcontext():
            model = timm.create_model(source, pretrained=pretrained, **kwargs)
    except RuntimeError as err:
        raise ValueError(f"encoder {name!r}: {err}") from None
    model.reset_classifier(0)  # the pooled pre-logits are the embedding
    if not hasattr(model, "blocks") or not hasattr(model, "patch_embed"):
        raise ValueError(f"encoder {name!r}: not a ViT (mirage needs patch tokens)")
    model = model.eval().to(device)
    cfg = timm.data.resolve_data_config(model=model)
    shape = (1, 3, 1, 1)
    return TimmEncoder(
        name=name,
        model=model,
        image_size=int(cfg["input_size"][-1]),
        mean=torch.tensor(cfg["mean"]).view(shape),
        std=torch.tensor(cfg["std"]).view(shape),
        device=device,
        autocast_dtype=_autocast_dtype(dtype, device),
    )


def random_spec(name: str) -> tuple[str, int]:
    """`random:ARCH:SEED` -> (ARCH, SEED); ARCH may itself hold colons (`local-dir:PATH`)."""
    arch, _, seed = name.removeprefix("random:").rpartition(":")
    if not arch or not seed.lstrip("-").isdigit():
        raise ValueError(f"encoder {name!r}: expected random:ARCH:SEED")
    return arch, int(seed)


def random_twin(spec: str, seed: int) -> str:
    """The spec of the same architecture as `spec` with random weights (seeded):
    the baseline that the configured encoder's learned features must beat."""
    timm = spec.startswith("timm:")
    rest = spec.removeprefix("timm:")
    if rest.startswith("random:"):
        arch = random_spec(rest)[0]
    elif rest.startswith("local-dir:") or timm:
        arch = rest  # a saved directory (its config gives the architecture) or a timm model name
    else:
        arch = rest.partition(":")[0]  # open_clip ARCH:TAG
    return f"{'timm:' if timm else ''}random:{arch}:{seed}"


def save_encoder(model: torch.nn.Module, arch: str, out: Path) -> None:
    """Save in open_clip's local-dir layout (loadable as `local-dir:OUT`)."""
    from safetensors.torch import save_file

    cfg = open_clip.get_model_config(arch)
    out.mkdir(parents=True, exist_ok=True)
    (out / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": cfg, "preprocess_cfg": {"mean": list(OPENAI_MEAN), "std": list(OPENAI_STD)}}, indent=2))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "open_clip_model.safetensors"))
