"""Train the toy profile's small open_clip model contrastively on captions."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.optimization import get_cosine_schedule_with_warmup

from mirage.data.params import TrainEncoder
from mirage.models.encoders import Encoder, load_encoder


def train(
    cfg: TrainEncoder,
    images: np.ndarray,
    captions: list[str],
    on_step: Callable[[int, float], None] | None = None,
    checkpoints=None,
) -> Encoder:
    """images: uint8 N x H x W x 3, captions: N strings.  CLIP loss where every
    item with the same caption counts as a positive (toy captions repeat).
    `checkpoints` (mirage.models.checkpoint): resume from the last one, save new ones."""
    encoder = load_encoder(f"random:{cfg.config}:{cfg.seed}", torch.device("cpu"))
    model = encoder.model.train()
    rng = np.random.default_rng(cfg.seed)
    tokens = encoder.tokenizer(captions)
    _, caption_ids = np.unique(captions, return_inverse=True)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.1)
    # linear warmup over the first 1/10 of the steps, then cosine decay to 0
    sched = get_cosine_schedule_with_warmup(opt, max(cfg.steps // 10, 1), cfg.steps)
    parts = {"model": model, "optimizer": opt, "schedule": sched}
    first = checkpoints.resume(0, parts, rng, on_step) if checkpoints else 0
    for step in range(first, cfg.steps):
        idx = rng.integers(0, len(images), cfg.batch_size)
        batch = images[idx]
        flip = rng.random(len(idx)) < 0.5
        batch = np.where(flip[:, None, None, None], batch[:, :, ::-1], batch)
        img = model.encode_image(encoder.preprocess(batch), normalize=True)
        txt = model.encode_text(tokens[idx], normalize=True)
        logits = model.logit_scale.exp() * img @ txt.T
        same = torch.from_numpy(caption_ids[idx][:, None] == caption_ids[idx][None]).float()
        target = same / same.sum(1, keepdim=True)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, np.log(100))
        if on_step:
            on_step(step, loss.item())
        if checkpoints:
            checkpoints.step_done(0, step + 1, cfg.steps, parts, rng, on_step)
    model.eval()
    return encoder
