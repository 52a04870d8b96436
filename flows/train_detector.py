"""Stage train_detector: Faster R-CNN on the discovered pseudo-boxes of generated images."""
from __future__ import annotations

from prefect import flow, get_run_logger

from mirage.data.params import Runner, TrainDetector
from mirage.data.store import atomic_dir
from mirage.models.checkpoint import Checkpoints, data_key
from mirage.run.stage import LossProgress, command, parse
from tasks.train_detector import (
    merge_predictions,
    mix_weights,
    paste_pool,
    predict,
    pseudo_labelled,
    save_detector,
    train,
)


@flow(name="train_detector")
def train_detector_flow(cfg: TrainDetector, classes: list[str], images: str, objects: str, out: str,
                        runner: Runner = Runner(), imported: str | None = None) -> list[float]:
    """Round 0 on the discovered boxes of generated and imported images (in
    the shares of `train_detector.mix`), then one self-training round per
    score in cfg.self_train_scores, on the same images (transductive on the
    imported ones).  Saves every round under OUT/round-K."""
    log = get_run_logger()
    data, labelled, sources = pseudo_labelled(images, objects, classes if cfg.class_aware else None, imported,
                                              cfg.drop_spanning)
    keep, probs = mix_weights(sources, cfg.mix)
    if len(keep) < len(data):
        data, labelled = data[keep], [labelled[i] for i in keep]
    counts = {s: sources.count(s) for s in sorted(set(sources))}
    log.info("images with discovered objects: %s; drawn in shares %s", counts,
             {s: cfg.mix.get(s, 0.0) for s in counts})
    pool = paste_pool(labelled, data.shape[1:3]) if cfg.copy_paste else None
    num_classes = len(classes) if cfg.class_aware else 1
    rounds = [(cfg.steps, None), *[(cfg.self_train_steps, s) for s in cfg.self_train_scores]]
    model, finals = None, []
    checkpoints = Checkpoints("train_detector", data_key(cfg.digest(), classes, data, labelled), runner.checkpoint_every)
    with atomic_dir(out) as tmp:
        for r, (steps, score) in enumerate(rounds):
            if score is not None:
                labelled = merge_predictions(labelled, predict(model, data), score)
            log.info("round %d: %d images, %d boxes, %d steps", r, len(data), sum(len(x["boxes"]) for x in labelled), steps)
            with LossProgress(steps, f"train_detector round {r}") as on_step:
                model, dcfg = train(cfg, data, labelled, on_step, steps=steps, start=model, num_classes=num_classes,
                                    paste_pool=pool, checkpoints=checkpoints, round_=r, probs=probs)
            if r in checkpoints.resumed:
                log.info("round %d: resumed from its checkpoint at step %d of %d", r, checkpoints.resumed[r], steps)
            save_detector(model, dcfg, tmp / f"round-{r}")
            finals.append(on_step.mean())
            log.info("round %d: loss %.3f -> %.3f", r, on_step.losses[0], finals[-1])
    checkpoints.clear()  # the model is in place
    return finals


def main(argv: list[str] | None = None):
    """The stage's command; returns what its flow returns (counts, metrics)."""
    params, args = parse("train_detector", ["images", "imported", "objects", "out"], argv)
    return train_detector_flow(params.train_detector, list(params.discover.classes), args.images, args.objects, args.out,
                               params.runner, args.imported)


if __name__ == "__main__":
    command(main)
