"""Stage train_generator: the toy profile's diffusion model, saved with save_pretrained."""
from __future__ import annotations

import numpy as np
from prefect import flow, get_run_logger

from mirage.data.images import decode_png
from mirage.data.params import Runner, TrainGenerator
from mirage.data.store import atomic_dir, read_table
from mirage.models.checkpoint import Checkpoints, data_key
from mirage.run.stage import LossProgress, command, parse
from tasks.train_generator import train


def load_labelled(scenes_dir: str, class_names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Images and the class of each image's largest object."""
    rows = read_table(scenes_dir, columns=["image", "objects"]).to_pylist()
    images = np.stack([decode_png(r["image"]) for r in rows])
    labels = [
        class_names.index(max(r["objects"], key=lambda o: o["box"][2] * o["box"][3])["class_name"])
        for r in rows
    ]
    return images, np.array(labels)


@flow(name="train_generator")
def train_generator_flow(cfg: TrainGenerator, class_names: list[str], scenes: str, out: str,
                         runner: Runner = Runner()) -> float:
    log = get_run_logger()
    images, labels = load_labelled(scenes, class_names)
    log.info("training on %d images, %d classes, %d steps", len(images), len(class_names), cfg.steps)
    checkpoints = Checkpoints("train_generator", data_key(cfg.digest(), class_names, images, labels),
                              runner.checkpoint_every)
    with LossProgress(cfg.steps, "train_generator", window=50, log_every=500, log=log) as on_step:
        pipe = train(cfg, images, labels, class_names, on_step, checkpoints)
    if checkpoints.resumed:
        log.info("resumed from its checkpoint at step %d of %d", checkpoints.resumed[0], cfg.steps)
    with atomic_dir(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
    checkpoints.clear()
    final = on_step.mean(100)
    log.info("saved %s (final loss %.4f)", out, final)
    return final


def main(argv: list[str] | None = None) -> None:
    params, args = parse("train_generator", ["scenes", "out"], argv)
    train_generator_flow(params.train_generator, list(params.toyworld.classes), args.scenes, args.out, params.runner)


if __name__ == "__main__":
    command(main)
