"""Where models run and in which precision: `device` and `dtype` parameters resolved."""
from __future__ import annotations

import threading

import torch

# Building a model is not thread-safe: diffusers' from_pretrained builds under accelerate's
# init_empty_weights, which patches torch.nn.Module for the whole process, so a model built meanwhile in
# another thread (two stages side by side: runner.parallel_stages) gets meta tensors and cannot be used.
# Every loader and builder holds this lock while it constructs.  Building also draws its random
# initial weights from torch's global RNG, one per process: `TorchRNG` holds the same lock.
MODEL_BUILD = threading.RLock()


class TorchRNG:
    """A private stream of torch's global RNG: the draws `torch.manual_seed(seed)`
    starts, whatever other threads seed or draw between them.  `with rng:`
    holds MODEL_BUILD, swaps this stream in, and on leaving saves where it got
    to and puts the process's state back.  Why: stages side by side
    (runner.parallel_stages) seeding the one global RNG interleaved, and a
    detector trained beside discover_splits' random-weight baseline (its
    `torch.manual_seed` mid-training) came out with other bytes on a busy
    machine.  Code that seeds or draws while another stage may run does it
    inside one of these (torchvision's samplers and weight init take no
    generator)."""

    def __init__(self, seed: int):
        self.state = torch.Generator().manual_seed(seed).get_state()  # what torch.manual_seed(seed) leaves
        self._saved: list[torch.Tensor] = []

    def __enter__(self) -> "TorchRNG":
        MODEL_BUILD.acquire()
        self._saved.append(torch.get_rng_state())
        torch.set_rng_state(self.state)
        return self

    def __exit__(self, *exc) -> None:
        self.state = torch.get_rng_state()
        torch.set_rng_state(self._saved.pop())
        MODEL_BUILD.release()

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(name: str = "auto") -> torch.device:
    """`auto`: the first GPU if there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: float16 on a GPU, float32 on CPU (half precision is slow or missing there)."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def compute_dtype(name: str, device: torch.device) -> str:
    """The precision an encoder actually computes in, as a name for item keys:
    autocast's dtype on a GPU, float32 on CPU whatever was asked."""
    return str(resolve_dtype(name, device) if device.type == "cuda" else torch.float32).removeprefix("torch.")
