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

        from mirage.data.store import sweep_temps

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

        from mirage.data.store import writing

        path = self._path(round_, step)
        with writing(path) as tmp:
            torch.save(state, tmp)
        for older in self.folder.glob(f"round-{round_}-step-*.pt"):
            if older != path:
                older.unlink(missing_ok=True)

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def resume(self, round_: int, parts: dict[str, Any], rng, on_step=None) -> int:
        """Load the round's last checkpoint into `parts` (name -> anything
        with state_dict/load_state_dict: model, EMA, optimizer, schedule),
        NumPy's `rng`, torch's generator and `on_step`'s losses; the step to
        continue from (0: none)."""
        import torch

        found = self.latest(round_)
        if not found:
            return 0
        step, state = found
        for name, part in parts.items():
            part.load_state_dict(state[name])
        rng.bit_generator.state = state["numpy_rng"]
        torch.set_rng_state(state["torch_rng"])
        if hasattr(on_step, "resume"):
            on_step.resume(state["losses"])
        self.resumed[round_] = step
        return step

    def step_done(self, round_: int, step: int, steps: int, parts: dict[str, Any], rng, on_step=None) -> None:
        """After `step` of `steps`: save a checkpoint when one is due."""
        import torch

        if self.due(step, steps):
            self.save(round_, step, {**{name: part.state_dict() for name, part in parts.items()},
                                     "numpy_rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
                                     "losses": list(getattr(on_step, "losses", []))})


def data_key(*arrays_or_values: Any) -> str:
    """What a training depends on, hashed: arrays by their bytes, the rest as JSON."""
    import hashlib
    import json

    import numpy as np

    h = hashlib.sha256()
    for value in arrays_or_values:
        if isinstance(value, np.ndarray):
            h.update(value.tobytes())
        else:
            h.update(json.dumps(value, sort_keys=True, default=str).encode())
    return h.hexdigest()[:24]
