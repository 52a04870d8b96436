"""Stage import: your own images, read as RGB (tasks of flows/import_images.py).

Finding the files and telling when they changed is mirage/data/sources.py:
the scheduler needs it too, to decide whether this stage is stale.
"""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from mirage.data import schema
from mirage.data.images import encode_png
from mirage.data.params import Sources
from mirage.data.sources import SourceFile
from mirage.data.store import Partial, item_key


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_image(data: bytes, max_size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Encoded image bytes -> uint8 H x W x 3 (EXIF orientation applied,
    converted to RGB, the longest side at most `max_size`), and the original
    (width, height) after orientation."""
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(data)) as im:
        im.load()
        im = ImageOps.exif_transpose(im)
        if im.mode in ("RGBA", "LA", "P") and (im.mode != "P" or "transparency" in im.info):
            rgba = im.convert("RGBA")  # transparent pixels over white, not over whatever colour they hide
            im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        im = im.convert("RGB")
        original = im.size
        if max(original) > max_size:
            scale = max_size / max(original)
            im = im.resize((max(1, round(original[0] * scale)), max(1, round(original[1] * scale))), Image.LANCZOS)
        return np.asarray(im, dtype=np.uint8), original


VERSION = 1


def import_batch(cfg: Sources, specs: list[dict]) -> pa.Table | Partial:
    rows, errors = [], {}
    for s in specs:
        try:
            data = Path(s["path"]).read_bytes()
            if content_hash(data) != s["sha256"]:
                raise OSError("the file changed while importing: run again")
            image, (ow, oh) = read_image(data, cfg.max_size)
        except Exception as err:  # noqa: BLE001 - PIL raises several types
            why = "not an image format PIL reads, or corrupt" if type(err).__name__ == "UnidentifiedImageError" else err
            errors[s["key"]] = (s["name"], f"cannot be read as an image: {type(err).__name__}: {why}")
            continue
        rows.append({"key": s["key"], "id": f"i-{s['sha256'][:16]}", "image": encode_png(image),
                     "width": image.shape[1], "height": image.shape[0], "prompt": "", "class_name": "",
                     "seed": 0, "model": "imported", "steps": 0, "guidance": 0.0, "provenance": "imported",
                     "source": s["name"], "original_width": ow, "original_height": oh})
    table = pa.Table.from_pylist(rows, schema=schema.IMPORTED)
    return Partial(table, errors) if errors else table


@dataclass
class Found:
    files: list[SourceFile]
    wanted: list[tuple[str, dict]]
    duplicates: list[tuple[str, str]]  # (file, the file it duplicates)


def plan(cfg: Sources, files: list[SourceFile], on_file=lambda n: None) -> Found:
    """The items `files` (mirage.data.sources.find_files) make: one per
    distinct content; `on_file(1)` after each file is hashed."""
    wanted, first, duplicates = [], {}, []
    for f in files:
        try:
            sha = content_hash(f.path.read_bytes())
        except OSError as err:
            sha = content_hash(f"unreadable:{f.name}:{err}".encode())  # an item that fails, named
        if sha in first:
            duplicates.append((f.name, first[sha]))
        else:
            first[sha] = f.name
            key = item_key("import", VERSION, sha, cfg.max_size)
            wanted.append((key, {"key": key, "path": str(f.path), "name": f.name, "sha256": sha}))
        on_file(1)
    return Found(files, wanted, duplicates)
