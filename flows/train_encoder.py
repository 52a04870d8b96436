"""Stage train_encoder: the toy profile's open_clip model, in open_clip's local-dir layout."""
from __future__ import annotations

import numpy as np
from prefect import flow, get_run_logger

from mirage.data.images import decode_png
from mirage.data.params import Runner, TrainEncoder
from mirage.data.store import atomic_dir, read_table
from mirage.models.checkpoint import Checkpoints, data_key
from mirage.models.encoders import save_encoder
from mirage.run.stage import LossProgress, command, parse
from tasks.train_encoder import train


@flow(name="train_encoder")
def train_encoder_flow(cfg: TrainEncoder, scenes: str, out: str, runner: Runner = Runner()) -> float:
    log = get_run_logger()
    rows = read_table(scenes, columns=["image", "caption"]).to_pylist()
    images = np.stack([decode_png(r["image"]) for r in rows])
    captions = [r["caption"] for r in rows]
    log.info("training %s on %d captioned images, %d steps", cfg.config, len(rows), cfg.steps)
    checkpoints = Checkpoints("train_encoder", data_key(cfg.digest(), images, captions), runner.checkpoint_every)
    with LossProgress(cfg.steps, "train_encoder") as on_step:
        encoder = train(cfg, images, captions, on_step, checkpoints)
    if checkpoints.resumed:
        log.info("resumed from its checkpoint at step %d of %d", checkpoints.resumed[0], cfg.steps)
    with atomic_dir(out) as tmp:
        save_encoder(encoder.model, cfg.config, tmp)
    checkpoints.clear()
    final = on_step.mean(50)
    log.info("saved %s (final loss %.3f)", out, final)
    return final


def main(argv: list[str] | None = None):
    """The stage's command; returns what its flow returns (counts, metrics)."""
    params, args = parse("train_encoder", ["scenes", "out"], argv)
    return train_encoder_flow(params.train_encoder, args.scenes, args.out, params.runner)


if __name__ == "__main__":
    command(main)
