"""Train the toy profile's class-conditional diffusion model (DDPM loss)."""
from __future__ import annotations

import copy
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from diffusers.optimization import get_cosine_schedule_with_warmup

from mirage.data.params import TrainGenerator
from mirage.models.toy_pipeline import ToyPipeline


def build_unet(cfg: TrainGenerator, image_size: int, num_classes: int) -> UNet2DModel:
    n = len(cfg.block_out_channels)
    # attention only at the middle resolution: cheap at 32 px, and enough for shape layout
    down = tuple("AttnDownBlock2D" if i == n // 2 else "DownBlock2D" for i in range(n))
    up = tuple("AttnUpBlock2D" if i == (n - 1) // 2 else "UpBlock2D" for i in range(n))
    return UNet2DModel(
        sample_size=image_size,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=cfg.block_out_channels,
        down_block_types=down,
        up_block_types=up,
        norm_num_groups=8,
        num_class_embeds=num_classes + 1,  # + the "no class" id for classifier-free guidance
    )


def train(
    cfg: TrainGenerator,
    images: np.ndarray,
    labels: np.ndarray,
    class_names: list[str],
    on_step: Callable[[int, float], None] | None = None,
    checkpoints=None,
) -> ToyPipeline:
    """images: uint8 N x H x W x 3; labels: int N (index into class_names).
    `checkpoints` (mirage.models.checkpoint): resume from the last one, save new ones."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    unet = build_unet(cfg, images.shape[1], len(class_names))
    ema = copy.deepcopy(unet).requires_grad_(False)
    noise_sched = DDPMScheduler(num_train_timesteps=cfg.train_timesteps, beta_schedule="squaredcos_cap_v2")
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=1e-4)
    # linear warmup over the first 1/20 of the steps, then cosine decay to 0
    sched = get_cosine_schedule_with_warmup(opt, max(cfg.steps // 20, 1), cfg.steps)
    data = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    targets = torch.from_numpy(labels).long()
    null = len(class_names)
    unet.train()
    parts = {"unet": unet, "ema": ema, "optimizer": opt, "schedule": sched}
    first = checkpoints.resume(0, parts, rng, on_step) if checkpoints else 0
    for step in range(first, cfg.steps):
        idx = torch.from_numpy(rng.integers(0, len(data), cfg.batch_size))
        x0, y = data[idx], targets[idx].clone()
        flip = torch.from_numpy(rng.random(len(idx)) < 0.5)
        x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)  # shapes are mirror-symmetric
        y[torch.from_numpy(rng.random(len(idx)) < cfg.label_dropout)] = null
        noise = torch.randn_like(x0)
        t = torch.randint(0, cfg.train_timesteps, (len(idx),))
        loss = F.mse_loss(unet(noise_sched.add_noise(x0, noise, t), t, class_labels=y).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema.parameters(), unet.parameters()):
                e.lerp_(p, 1 - decay)
        if on_step:
            on_step(step, loss.item())
        if checkpoints:
            checkpoints.step_done(0, step + 1, cfg.steps, parts, rng, on_step)
    sampler = DDIMScheduler.from_config(noise_sched.config)
    return ToyPipeline(unet=ema.eval(), scheduler=sampler, class_names=class_names)
