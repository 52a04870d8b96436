"""Model identity for item keys: a model named by path is identified by its bytes."""
from __future__ import annotations

import hashlib
from pathlib import Path


def model_fingerprint(spec: str) -> str:
    """`name@hash` for a local model directory or file (hash of every file's
    path and bytes), the spec itself for a hub id or a random-weight baseline."""
    path = Path(spec.split("local-dir:", 1)[-1])
    if not path.exists():
        return spec
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        digest.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return f"{path.name}@{digest.hexdigest()[:12]}"


def encoder_spec(arg: str) -> str:
    """A directory on disk is a local model (timm's if it holds timm's
    config.json, else open_clip's); anything else is a name."""
    path = Path(arg)
    if not path.is_dir():
        return arg
    return f"timm:local-dir:{arg}" if (path / "config.json").exists() and not (path / "open_clip_config.json").exists() else f"local-dir:{arg}"
