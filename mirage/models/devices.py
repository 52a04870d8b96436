"""Where models run and in which precision: `device` and `dtype` parameters resolved."""
from __future__ import annotations

import torch

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
