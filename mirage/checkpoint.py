"""Training checkpoints: a killed training resumes from its last checkpoint.

A checkpoint is everything the next step depends on: model and optimizer
state, the learning-rate schedule, both random generators (NumPy's, which
draws batches and augmentations, and torch's, which samples proposals) and
the losses so far.  Resumed from it, training continues exactly as if it had
never stopped: the saved model is byte-identical to an uninterrupted run's.

Checkpoints live under `.mirage/checkpoints/<stage>/<key>/`, `key` a hash of
what the training depends on (params, data), outside every DVC output;
written atomically (torch.save to a temp name, renamed) and loaded with
`torch.load(weights_only=True)`.  The stage removes them once its output is
in place.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

CHECKPOINTS = Path(".mirage") / "checkpoints"


class Checkpoints:
    """Checkpoints of one training (several rounds), every `every` steps (0: never)."""

    def __init__(self, stage: str, key: str, every: int, root: str | Path = "."):
        self.folder = Path(root) / CHECKPOINTS / stage / key
        self.every = every
        self.resumed: dict[int, int] = {}  # round -> the step it resumed at

    def _path(self, round_: int, step: int) -> Path:
        return self.folder / f"round-{round_}-step-{step:07d}.pt"

    def latest(self, round_: int) -> tuple[int, dict[str, Any]] | None:
        """(step, state) of the round's last checkpoint, or None."""
        import torch

        from mirage.store import sweep_temps

        sweep_temps(self.folder)  # a checkpoint the kill interrupted
        found = sorted(self.folder.glob(f"round-{round_}-step-*.pt"))
        if not found:
            return None
        step = int(found[-1].stem.rsplit("-", 1)[1])
        return step, torch.load(found[-1], weights_only=True)

    def due(self, step: int, steps: int) -> bool:
        """Whether to save after `step` steps of `steps` (always at the round's end)."""
        return bool(self.every) and (step % self.every == 0 or step == steps)

    def save(self, round_: int, step: int, state: dict[str, Any]) -> None:
        import torch

        from mirage.store import writing

        path = self._path(round_, step)
        with writing(path) as tmp:
            torch.save(state, tmp)
        for older in self.folder.glob(f"round-{round_}-step-*.pt"):
            if older != path:
                older.unlink(missing_ok=True)

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
