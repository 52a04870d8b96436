"""Activation maps of every unit of a generator's denoiser and of a ViT encoder, on a common grid.

For stage concepts (tasks/concepts.py).  Maps are float32 B x units x grid x
grid; a model's `layers` [(name, units)] give the column order.
- the generator: the outputs of the listed UNet modules (every resnet of the
  down, mid and up blocks when none is listed) for the image noised to
  `timestep` with the "no class" label (the toy pipeline) or the empty prompt
  on VAE latents (a Stable Diffusion UNet): the UNet patch backbone's recipe
  (DDAE).  A DiT has no UNet: refused.
- an encoder: each listed block's MLP activation (after its nonlinearity) of
  an open_clip or timm ViT, class and register tokens dropped, the tokens on
  the patch grid.
Each map is resized to grid x grid (bilinear; antialiased when shrinking).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

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
    "no class") or a text-to-image pipeline's UNet (empty prompt, VAE latents)."""

    def __init__(self, spec: str, layers: tuple[str, ...], timestep: int, noise_seed: int, grid: int,
                 device: torch.device, random_seed: int | None = None):
        gen = load_generator(spec, str(device))
        if gen.kind == "dit":
            raise ValueError(f"generate.model {spec!r}: a DiT generator's units are not supported by stage concepts "
                             "(a UNet pipeline is: the toy one, Stable Diffusion)")
        self.pipe, self.kind, self.device, self.grid = gen.pipe, gen.kind, device, grid
        unet = self.pipe.unet
        if random_seed is not None:  # the same architecture, random weights: the control
            torch.manual_seed(random_seed)
            unet = type(unet).from_config(unet.config).to(device)
        self.unet = unet.eval()
        names = list(layers) or [n for n, m in unet.named_modules() if n.rsplit(".", 2)[-2:-1] == ["resnets"]]
        try:
            self.modules = [unet.get_submodule(n) for n in names]
        except AttributeError as err:
            raise ValueError(f"concepts.generator_layers: the UNet has no module {err}") from None
        from diffusers import DDPMScheduler

        self.scheduler = DDPMScheduler.from_config(self.pipe.scheduler.config)
        self.timestep, self.noise_seed = timestep, noise_seed
        self.layers = list(zip(names, (self._channels(m) for m in self.modules)))
        if self.kind == "toy":
            self.size = int(unet.config.sample_size)
            self.cond = None
        else:
            self.size = int(unet.config.sample_size) * self.pipe.vae_scale_factor
            tok = self.pipe.tokenizer([""], padding="max_length", max_length=self.pipe.tokenizer.model_max_length,
                                      return_tensors="pt")
            with torch.inference_mode():
                self.cond = self.pipe.text_encoder(tok.input_ids.to(device))[0]

    @staticmethod
    def _channels(module: torch.nn.Module) -> int:
        for attr in ("out_channels", "conv2"):
            value = getattr(module, attr, None)
            if isinstance(value, int):
                return value
            if isinstance(value, torch.nn.Conv2d):
                return value.out_channels
        raise ValueError(f"concepts.generator_layers: cannot tell the channels of {type(module).__name__}")

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
                labels = torch.full((len(x),), self.pipe.null_class, device=self.device)
                self.unet(noisy, t, class_labels=labels)
            else:
                self.unet(noisy.to(self.unet.dtype), t, encoder_hidden_states=self.cond.expand(len(x), -1, -1))

        outs = _hooked(self.modules, run, lambda out: resize_maps(out, self.grid))
        return torch.cat(outs, dim=1)


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
