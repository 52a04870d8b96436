"""The toy profile's class-conditional diffusion pipeline, built from diffusers parts.

A `diffusers.UNet2DModel` with a class embedding (one extra id is the
"no class" token for classifier-free guidance) and a DDIM scheduler, saved and
loaded with diffusers' own `save_pretrained` / `from_pretrained` (safetensors).
"""
from __future__ import annotations

import numpy as np
import torch
from diffusers import DDIMScheduler, DiffusionPipeline, UNet2DModel


class ToyPipeline(DiffusionPipeline):
    def __init__(self, unet: UNet2DModel, scheduler: DDIMScheduler, class_names: list[str] | None = None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self.register_to_config(class_names=list(class_names or []))

    @property
    def null_class(self) -> int:
        return len(self.config.class_names)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: list[int],
        generators: list[torch.Generator],
        num_inference_steps: int = 25,
        guidance_scale: float = 2.0,
    ) -> np.ndarray:
        """Sample one image per label; item i's noise comes from generators[i] only.

        Returns uint8 N x H x W x 3.
        """
        size = self.unet.config.sample_size
        channels = self.unet.config.in_channels
        device = self.unet.device
        x = torch.stack([torch.randn(channels, size, size, generator=g) for g in generators]).to(device)
        labels = torch.tensor(class_labels, device=device)
        null = torch.full_like(labels, self.null_class)
        self.scheduler.set_timesteps(num_inference_steps)
        for t in self.scheduler.timesteps:
            if guidance_scale == 1.0:
                eps = self.unet(x, t, class_labels=labels).sample
            else:
                # two passes of the batch, not one of [x, x]: in a doubled batch an
                # item's unconditional half sits at another position, and on
                # some CPUs that changes its floats (8e-7), hence its pixels
                cond = self.unet(x, t, class_labels=labels).sample
                uncond = self.unet(x, t, class_labels=null).sample
                eps = uncond + guidance_scale * (cond - uncond)
            x = self.scheduler.step(eps, t, x, eta=0.0).prev_sample
        images = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return images.permute(0, 2, 3, 1).cpu().numpy()
