"""Model identity for item keys: a model named by path is identified by its bytes."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path


def hub_cache() -> Path:
    """Hugging Face's cache of downloaded hub snapshots."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hub_revision(repo_id: str) -> str | None:
    """The commit of `repo_id`'s snapshot in the local cache (what a loader
    just used, or will use offline), or None when it is not cached."""
    ref = hub_cache() / f"models--{repo_id.replace('/', '--')}" / "refs" / "main"
    return ref.read_text().strip() if ref.is_file() else None


def hub_repo(spec: str) -> str | None:
    """The hub repository a model spec downloads from: a diffusers id itself,
    an open_clip ARCH:TAG's or a timm:NAME's pretrained source; None for a
    random-weight model or a spec with no hub source."""
    if spec.startswith(("random:", "timm:random:", "local-dir:", "timm:local-dir:")):
        return None
    if spec.startswith("timm:"):
        import timm

        cfg = timm.models.get_pretrained_cfg(spec.removeprefix("timm:"))
        return getattr(cfg, "hf_hub_id", None) if cfg else None
    if ":" in spec:
        import open_clip

        arch, _, tag = spec.partition(":")
        return (open_clip.get_pretrained_cfg(arch, tag) or {}).get("hf_hub", "").strip("/") or None
    return spec if spec.count("/") == 1 else None


def model_fingerprint(spec: str) -> str:
    """`name@hash` for a local model directory or file (hash of every file's
    path and bytes); `spec@commit` for a hub model whose snapshot is cached
    (the revision its bytes came from); the spec itself otherwise (a
    random-weight baseline, a hub model not downloaded yet)."""
    path = Path(spec.split("local-dir:", 1)[-1])
    if not path.exists():
        repo = hub_repo(spec)
        revision = hub_revision(repo) if repo else None
        return f"{spec}@{revision}" if revision else spec
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


def under(root: Path, model: str) -> str:
    """A model named in params.yaml: a path relative to the project root if it
    exists there, else the name itself (a hub id, `random:...`)."""
    return str(root / model) if (root / model).exists() else model
