"""Keep the useful part of the generated images: semantic dedup and balanced clusters.

SemDeDup (Abbas et al. 2023): k-means on the embeddings; within a cluster,
items are taken farthest from the centroid first (the least prototypical, as
SemDeDup's code keeps), and an item whose cosine to an already kept item of
its cluster exceeds 1 - `dedup_eps` is a duplicate of it.  Balanced sampling
(DINOv2's LVD-142M; Vo et al. 2024): hierarchical k-means, each level
clustering the centroids of the level below; a quota is split equally over
the top-level clusters, what a small cluster cannot fill goes to the others,
and so on down to the first level, whose items are taken in a seeded order
that depends on each item alone.

Item by item: a run keeps the previous run's centroids and decisions when the
clustering params and the encoder are the same, assigns new images to the
nearest existing centroid and dedups them against what their cluster kept;
any other change recomputes the clusters (curate alone: its output is ids).
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mirage.data.params import Curate
from mirage.data.store import item_key

VERSION = 1

TABLE = "curated.parquet"
STATE = "state.json"  # the clustering: params digest, encoder, centroids per level, decisions


def curated_schema(levels: int) -> pa.Schema:
    return pa.schema([("id", pa.string()), ("class_name", pa.string()),
                      *[(f"cluster_{level}", pa.int32()) for level in range(levels)],
                      ("kept", pa.bool_()), ("reason", pa.string()), ("nearest_kept", pa.string()),
                      ("cosine", pa.float32())])


def kmeans(x: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(centroids k x D, label of each row); k capped at the rows' count."""
    from sklearn.cluster import KMeans

    k = max(1, min(k, len(x)))
    fit = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(x.astype(np.float64))
    return fit.cluster_centers_.astype(np.float32), fit.labels_.astype(np.int32)


def nearest(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    d = (x * x).sum(1)[:, None] - 2 * x @ centroids.T + (centroids * centroids).sum(1)[None, :]
    return d.argmin(axis=1).astype(np.int32)


def hierarchy(x: np.ndarray, clusters: tuple[int, ...], seed: int) -> list[np.ndarray]:
    """Centroids per level: level 0 clusters the items, level l the centroids of level l-1."""
    levels, points = [], x
    for level, k in enumerate(clusters):
        centroids, _ = kmeans(points, k, seed + level)
        levels.append(centroids)
        points = centroids
    return levels


def labels_of(x: np.ndarray, levels: list[np.ndarray]) -> np.ndarray:
    """items x levels: each item's cluster at every level (its level-0
    cluster's centroid decides the next level, and so on)."""
    out = np.zeros((len(x), len(levels)), np.int32)
    lab = nearest(x, levels[0]) if len(x) else np.zeros(0, np.int32)
    out[:, 0] = lab
    for level in range(1, len(levels)):
        up = nearest(levels[level - 1], levels[level])
        lab = up[lab]
        out[:, level] = lab
    return out


def dedup(emb: np.ndarray, cluster: np.ndarray, centroids: np.ndarray, eps: float,
          decided: dict[int, tuple[int | None, float]]) -> dict[int, tuple[int | None, float]]:
    """Row -> (the kept row it duplicates or None, the cosine to its nearest
    kept row of the cluster).  `decided`: rows whose decision stands (a
    previous run's: row -> kept row or None); new rows are decided against
    the kept rows of their cluster, farthest from its centroid first."""
    out: dict[int, tuple[int | None, float]] = {}
    for c in np.unique(cluster):
        rows = np.flatnonzero(cluster == c)
        old = [r for r in rows if r in decided]
        kept = [r for r in old if decided[r][0] is None]
        new = [r for r in rows if r not in decided]
        far = np.linalg.norm(emb[new] - centroids[c], axis=1) if new else np.zeros(0)
        for r in old:
            out[r] = decided[r]
        for r in [new[i] for i in np.argsort(-far, kind="stable")]:
            if kept:
                cos = emb[kept] @ emb[r]
                j = int(cos.argmax())
                if cos[j] > 1 - eps:
                    out[r] = (kept[j], float(cos[j]))
                    continue
                out[r] = (None, float(cos[j]))
            else:
                out[r] = (None, 0.0)
            kept.append(r)
    return out


def balanced(candidates: list[int], labels: np.ndarray, keys: list[str], target: int | None,
             per_cluster: int | None, seed: int) -> set[int]:
    """The rows balanced sampling keeps among `candidates`: at most
    `per_cluster` per first-level cluster, and `target` in all, split equally
    over the clusters of each level from the top (water-filling: a cluster
    smaller than its share gives the rest to its siblings)."""
    order = {r: item_key("curate-sample", seed, keys[r]) for r in candidates}
    if per_cluster is not None:
        by0: dict[int, list[int]] = {}
        for r in sorted(candidates, key=order.get):
            by0.setdefault(int(labels[r, 0]), []).append(r)
        candidates = [r for rows in by0.values() for r in rows[:per_cluster]]
    if target is None or target >= len(candidates):
        return set(candidates)

    def take(rows: list[int], quota: int, level: int) -> list[int]:
        if level < 0:
            return sorted(rows, key=order.get)[:quota]
        groups: dict[int, list[int]] = {}
        for r in rows:
            groups.setdefault(int(labels[r, level]), []).append(r)
        shares = water_fill([len(g) for g in groups.values()], quota)
        return [r for g, share in zip(groups.values(), shares) for r in take(g, share, level - 1)]

    return set(take(sorted(candidates), target, labels.shape[1] - 1))


def water_fill(sizes: list[int], quota: int) -> list[int]:
    """Equal shares of `quota` over groups of `sizes`, capped at each size,
    the remainder going to the groups that still have room (the first ones)."""
    shares = [0] * len(sizes)
    left = min(quota, sum(sizes))
    while left > 0:
        open_ = [i for i, s in enumerate(sizes) if shares[i] < s]
        each = max(1, left // len(open_))
        for i in open_:
            add = min(each, sizes[i] - shares[i], left)
            shares[i] += add
            left -= add
            if left == 0:
                break
    return shares


@dataclass
class Curated:
    table: pa.Table
    state: dict
    reused: int  # items whose cluster and dedup decision came from the previous run


def clustering_digest(cfg: Curate, model: str) -> str:
    """What the clusters depend on: the encoder and the clustering params."""
    return item_key("curate", VERSION, model, cfg.clusters, cfg.seed)


def curate(cfg: Curate, ids: list[str], classes: list[str | None], emb: np.ndarray, model: str,
           previous: dict | None) -> Curated:
    """Decide every generated image: its cluster per level, kept or why not
    (`duplicate` of `nearest_kept`, or `balance`: over its cluster's quota)."""
    emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    digest = clustering_digest(cfg, model)
    same = previous and previous.get("clustering") == digest and previous.get("dedup_eps") == cfg.dedup_eps
    if same and previous["levels"]:
        levels = [np.asarray(c, np.float32) for c in previous["levels"]]
    else:
        levels = hierarchy(emb, tuple(cfg.clusters), cfg.seed) if len(emb) else []
    labels = labels_of(emb, levels) if levels else np.zeros((len(emb), len(cfg.clusters)), np.int32)
    row = {i: r for r, i in enumerate(ids)}
    decided = {}
    if same:
        for image_id, (dup, cos) in previous["decisions"].items():
            if image_id in row and (dup is None or dup in row):
                decided[row[image_id]] = (None if dup is None else row[dup], cos)
    dups = dedup(emb, labels[:, 0], levels[0], cfg.dedup_eps, decided) if levels else {}
    unique = [r for r in range(len(ids)) if dups[r][0] is None]
    kept = balanced(unique, labels, ids, cfg.target, cfg.per_cluster, cfg.seed)
    reason = ["" if r in kept else "balance" if dups[r][0] is None else "duplicate" for r in range(len(ids))]
    cols = {"id": ids, "class_name": classes,
            **{f"cluster_{level}": labels[:, level].tolist() for level in range(len(cfg.clusters))},
            "kept": [r in kept for r in range(len(ids))], "reason": reason,
            "nearest_kept": [ids[dups[r][0]] if dups[r][0] is not None else None for r in range(len(ids))],
            "cosine": [dups[r][1] for r in range(len(ids))]}
    state = {"clustering": digest, "dedup_eps": cfg.dedup_eps, "levels": [c.tolist() for c in levels],
             "decisions": {ids[r]: [ids[d] if d is not None else None, cos] for r, (d, cos) in dups.items()}}
    return Curated(pa.table(cols, schema=curated_schema(len(cfg.clusters))), state, len(decided))


def table_bytes(table: pa.Table) -> bytes:
    out = io.BytesIO()
    pq.write_table(table, out, compression="zstd")
    return out.getvalue()


def state_bytes(state: dict) -> bytes:
    return json.dumps(state, sort_keys=True).encode()


def kept_ids(curated_dir: str) -> set[str]:
    """The ids curate kept (discover reads them when curate.enabled)."""
    from pathlib import Path

    t = pq.read_table(Path(curated_dir) / TABLE, columns=["id", "kept"])
    return {i for i, k in zip(t.column("id").to_pylist(), t.column("kept").to_pylist()) if k}


def duplicate_groups_png(table: pa.Table, images: dict[str, bytes], groups: int = 8, per_group: int = 8) -> bytes:
    """A contact sheet of the largest duplicate groups: each row a kept image
    (framed green) then the images dropped as its duplicates."""
    from PIL import Image, ImageDraw, ImageFont

    from mirage.data.images import decode_png

    rows = table.select(["id", "reason", "nearest_kept"]).to_pylist()
    dup_of: dict[str, list[str]] = {}
    for r in rows:
        if r["reason"] == "duplicate":
            dup_of.setdefault(r["nearest_kept"], []).append(r["id"])
    top = sorted(dup_of.items(), key=lambda kv: (-len(kv[1]), kv[0]))[:groups]
    tile, pad = 64, 4
    font = ImageFont.load_default(size=12)
    width = pad + (tile + pad) * (per_group + 1) + 60
    sheet = Image.new("RGB", (width, 24 + max(1, len(top)) * (tile + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    total = sum(len(v) for v in dup_of.values())
    draw.text((pad, 4), f"largest duplicate groups (kept first, framed green): {total} duplicates of "
                        f"{len(dup_of)} kept images" if top else "no duplicates found", fill=(20, 20, 20), font=font)
    for g, (keeper, dups) in enumerate(top):
        y = 24 + g * (tile + pad)
        for j, image_id in enumerate([keeper, *dups[:per_group]]):
            x = pad + j * (tile + pad)
            if image_id in images:
                im = Image.fromarray(decode_png(images[image_id])).resize((tile, tile), Image.NEAREST)
                sheet.paste(im, (x, y))
            if j == 0:
                draw.rectangle((x - 2, y - 2, x + tile + 1, y + tile + 1), outline=(0, 170, 0), width=2)
        draw.text((pad + (per_group + 1) * (tile + pad), y + tile // 2 - 6), f"+{len(dups)}", fill=(20, 20, 20),
                  font=font)
    out = io.BytesIO()
    sheet.save(out, format="PNG")
    return out.getvalue()
