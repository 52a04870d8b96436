"""Activation maps of every unit of a generator's denoiser and of a ViT encoder, on a common grid.

For stage concepts (tasks/concepts.py).  Maps are float32 B x units x grid x
grid; a model's `layers` [(name, units)] give the column order.
- the generator: the outputs of the listed UNet modules (every resnet of the
  down, mid and up blocks when none is listed) for the image noised to
  `timestep` with the "no class" label (the toy pipeline) or the empty prompt
  on VAE latents (a Stable Diffusion UNet), or a DiT's transformer blocks
  (the null class, VAE latents, tokens on the latent patch grid): the UNet
  patch backbone's recipe (DDAE).
- an encoder: each listed block's MLP activation (after its nonlinearity) of
  an open_clip or timm ViT, class and register tokens dropped, the tokens on
  the patch grid.
Each map is resized to grid x grid (bilinear; antialiased when shrinking).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from mirage.models.devices import TorchRNG
from mirage.models.encoders import ImageEncoder, TimmEncoder
from mirage.models.generators import load_generator


def resize_maps(maps: torch.Tensor, grid: int) -> torch.Tensor:
    """B x C x h x w -> B x C x grid x grid float32 (bilinear, antialiased when shrinking)."""
    maps = maps.float()
    if maps.shape[-2:] == (grid, grid):
        return maps
    return F.interpolate(maps, size=(grid, grid), mode="bilinear", align_corners=False,
                         antialias=maps.shape[-1] > grid or maps.shape[-2] > grid)


class Units:
    """A model's units: `layers` [(name, units)] in column order, and `maps(images)`."""

    layers: list[tuple[str, int]]

    @property
    def count(self) -> int:
        return sum(n for _, n in self.layers)

    def unit_name(self, column: int) -> tuple[str, int]:
        for name, n in self.layers:
            if column < n:
                return name, column
            column -= n
        raise IndexError(column)

    def maps(self, images: np.ndarray) -> torch.Tensor:
        raise NotImplementedError


def _hooked(modules: list[torch.nn.Module], run, transform) -> list[torch.Tensor]:
    """Run `run()` with a forward hook on each module; each output through `transform`."""
    captured: dict[int, torch.Tensor] = {}
    handles = [m.register_forward_hook(lambda _m, _i, out, i=i: captured.__setitem__(
        i, transform(out[0] if isinstance(out, tuple) else out))) for i, m in enumerate(modules)]
    try:
        with torch.inference_mode():
            run()
    finally:
        for h in handles:
            h.remove()
    return [captured[i] for i in range(len(modules))]


class GeneratorUnits(Units):
    """The generator's denoiser on the noised image: the toy UNet (class
    "no class"), a text-to-image pipeline's UNet (empty prompt, VAE latents)
    or a DiT's transformer blocks (the null class, VAE latents; each block's
    tokens on the latent patch grid)."""

    def __init__(self, spec: str, layers: tuple[str, ...], timestep: int, noise_seed: int, grid: int,
                 device: torch.device, random_seed: int | None = None):
        gen = load_generator(spec, str(device))
        self.pipe, self.kind, self.device, self.grid = gen.pipe, gen.kind, device, grid
        net = self.pipe.transformer if self.kind == "dit" else self.pipe.unet
        if random_seed is not None:  # the same architecture, random weights: the control
            with TorchRNG(random_seed):
                net = type(net).from_config(net.config).to(device=device, dtype=net.dtype)
        self.net = net.eval()
        if self.kind == "dit":
            default = [f"transformer_blocks.{i}" for i in range(len(net.transformer_blocks))]
        else:
            default = [n for n, m in net.named_modules() if n.rsplit(".", 2)[-2:-1] == ["resnets"]]
        names = list(layers) or default
        try:
            self.modules = [net.get_submodule(n) for n in names]
        except AttributeError as err:
            raise ValueError(f"concepts.generator_layers: the {type(net).__name__} has no module {err}") from None
        from diffusers import DDPMScheduler

        self.scheduler = DDPMScheduler.from_config(self.pipe.scheduler.config)
        self.timestep, self.noise_seed = timestep, noise_seed
        self.layers = list(zip(names, (self._channels(m) for m in self.modules)))
        # pixels per latent: the VAE halves the size per block after its first (DiTPipeline has no vae_scale_factor)
        scale = 1 if self.kind == "toy" else 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)
        self.size = int(net.config.sample_size) * scale
        self.cond = None
        if self.kind == "text2image":
            tok = self.pipe.tokenizer([""], padding="max_length", max_length=self.pipe.tokenizer.model_max_length,
                                      return_tensors="pt")
            with torch.inference_mode():
                self.cond = self.pipe.text_encoder(tok.input_ids.to(device))[0]

    def _channels(self, module: torch.nn.Module) -> int:
        if self.kind == "dit":  # a transformer block's width
            return int(self.net.config.num_attention_heads * self.net.config.attention_head_dim)
        for attr in ("out_channels", "conv2"):
            value = getattr(module, attr, None)
            if isinstance(value, int):
                return value
            if isinstance(value, torch.nn.Conv2d):
                return value.out_channels
        raise ValueError(f"concepts.generator_layers: cannot tell the channels of {type(module).__name__}")

    def _grid(self, out: torch.Tensor) -> torch.Tensor:
        if self.kind == "dit":  # B x tokens x C on the latent patch grid
            side = int(self.net.config.sample_size) // int(self.net.config.patch_size)
            out = out.reshape(len(out), side, side, -1).permute(0, 3, 1, 2)
        return resize_maps(out, self.grid)

    def maps(self, images: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device).permute(0, 3, 1, 2).float() / 127.5 - 1
        if x.shape[-1] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        if self.kind != "toy":
            with torch.inference_mode():
                x = self.pipe.vae.encode(x.to(self.pipe.vae.dtype)).latent_dist.mean * self.pipe.vae.config.scaling_factor
        noise = torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(self.noise_seed)).to(self.device)
        t = torch.full((len(x),), self.timestep, dtype=torch.long, device=self.device)
        noisy = self.scheduler.add_noise(x, noise.expand_as(x).to(x.dtype), t)

        def run():
            if self.kind == "toy":
                self.net(noisy, t, class_labels=torch.full((len(x),), self.pipe.null_class, device=self.device))
            elif self.kind == "dit":  # DiTPipeline's null class: the id after the last label
                null = int(self.net.config.num_embeds_ada_norm)
                self.net(noisy.to(self.net.dtype), timestep=t, class_labels=torch.full((len(x),), null, device=self.device))
            else:
                self.net(noisy.to(self.net.dtype), t, encoder_hidden_states=self.cond.expand(len(x), -1, -1))

        return torch.cat(_hooked(self.modules, run, self._grid), dim=1)


class EncoderUnits(Units):
    """Each block's MLP activation of an open_clip or timm ViT, on the patch grid."""

    def __init__(self, encoder: ImageEncoder, layers: tuple[int, ...], grid: int):
        self.encoder, self.grid = encoder, grid
        blocks = (list(encoder.model.blocks) if isinstance(encoder, TimmEncoder)
                  else list(encoder.model.visual.transformer.resblocks))
        index = list(layers) or list(range(len(blocks)))
        if any(not -len(blocks) <= i < len(blocks) for i in index):
            raise ValueError(f"concepts.encoder_layers: {list(layers)} out of range for {encoder.name!r} "
                             f"({len(blocks)} blocks)")
        self.index = [i % len(blocks) for i in index]
        acts = [blocks[i].mlp.act if isinstance(encoder, TimmEncoder) else blocks[i].mlp.gelu for i in self.index]
        fc = [blocks[i].mlp.fc1 if isinstance(encoder, TimmEncoder) else blocks[i].mlp.c_fc for i in self.index]
        self.modules = acts
        self.layers = [(f"block{i}.mlp", f.out_features) for i, f in zip(self.index, fc)]

    def _grid(self, tokens: torch.Tensor) -> torch.Tensor:
        gh, gw = self.encoder.patch_grid
        t = tokens[:, self.encoder.num_prefix_tokens:].float()  # B x T x C, batch-first in open_clip 3 and timm
        return resize_maps(t.reshape(len(t), gh, gw, -1).permute(0, 3, 1, 2), self.grid)

    def maps(self, images: np.ndarray) -> torch.Tensor:
        x = self.encoder.preprocess(images)
        outs = _hooked(self.modules, lambda: self.encoder.model.encode_image(x) if hasattr(self.encoder.model, "encode_image")
                       else self.encoder.model.forward_features(x), self._grid)
        return torch.cat(outs, dim=1)
