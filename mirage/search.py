"""Text-to-image search over the cached embeddings (`mirage search`).

Features are read lazily with polars (only `id` and `embedding`, batch by
batch, keeping the running top k), so memory does not grow with the table;
the images table is read only for the k hits.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from mirage.data.store import MANIFEST, table_metadata


@dataclass
class Hit:
    id: str
    score: float
    prompt: str
    path: str  # the Parquet shard holding the image
    image: bytes


def shard_files(root: str | Path) -> list[str]:
    root = Path(root)
    if not (root / MANIFEST).exists():
        raise FileNotFoundError(f"{root} has no {MANIFEST}: run `mirage run` first")
    return [str(root / s["file"]) for s in json.loads((root / MANIFEST).read_text())["shards"] if s["rows"]]


def top_k(features: str | Path, text: np.ndarray, k: int, batch_rows: int = 8192) -> list[tuple[str, float]]:
    """The k ids whose embedding has the highest cosine similarity with `text` (D,)."""
    best_ids: list[str] = []
    best: np.ndarray = np.empty(0, dtype=np.float32)
    lazy = pl.scan_parquet(shard_files(features)).select("id", "embedding")
    for batch in lazy.collect_batches(chunk_size=batch_rows):
        emb = batch["embedding"].to_numpy().astype(np.float32)
        scores = np.concatenate([best, emb @ text])
        ids = best_ids + batch["id"].to_list()
        keep = np.argsort(-scores, kind="stable")[:k]
        best, best_ids = scores[keep], [ids[i] for i in keep]
    return list(zip(best_ids, best.tolist()))


def search(query: str, features: str | Path, images: str | Path, encoder, k: int = 10) -> list[Hit]:
    """Rank cached images by similarity to `query` under the encoder that made the features."""
    from mirage.models.fingerprint import model_fingerprint

    recorded = table_metadata(features).get("model")
    if recorded != model_fingerprint(encoder.name):
        raise ValueError(f"features in {features} were computed with {recorded}, not with "
                         f"{model_fingerprint(encoder.name)} (features.encoder): run `mirage run` first")
    import torch

    with torch.inference_mode():
        text = encoder.encode_text([query])[0].float().cpu().numpy()
    ranked = top_k(features, text, k)
    wanted = [i for i, _ in ranked]
    rows = (pl.scan_parquet(shard_files(images), include_file_paths="path")
            .filter(pl.col("id").is_in(wanted)).select("id", "prompt", "path", "image").collect())
    by_id = {r["id"]: r for r in rows.iter_rows(named=True)}
    return [Hit(i, s, by_id[i]["prompt"], by_id[i]["path"], by_id[i]["image"]) for i, s in ranked if i in by_id]


def contact_sheet(hits: list[Hit], path: str | Path, tile: int = 128, columns: int = 5) -> None:
    """A grid PNG of the hits, best first, each captioned with its rank and score."""
    from PIL import Image, ImageDraw

    from mirage.data.images import decode_png
    from mirage.data.store import atomic_write_bytes

    rows = max(1, -(-len(hits) // columns))
    sheet = Image.new("RGB", (columns * tile, rows * (tile + 14)), "white")
    draw = ImageDraw.Draw(sheet)
    for n, hit in enumerate(hits):
        x, y = (n % columns) * tile, (n // columns) * (tile + 14)
        img = Image.fromarray(decode_png(hit.image)).resize((tile, tile), Image.NEAREST)
        sheet.paste(img, (x, y))
        draw.text((x + 2, y + tile), f"{n + 1}. {hit.score:.3f}", fill="black")
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    atomic_write_bytes(Path(path), buf.getvalue())
