"""Where models run and in which precision: `device` and `dtype` parameters resolved."""
from __future__ import annotations

import threading

import torch

# Building a model is not thread-safe: diffusers' from_pretrained builds under accelerate's
# init_empty_weights, which patches torch.nn.Module for the whole process, so a model built meanwhile in
# another thread (two stages side by side: runner.parallel_stages) gets meta tensors and cannot be used.
# Every loader and builder holds this lock while it constructs.
MODEL_BUILD = threading.RLock()

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
