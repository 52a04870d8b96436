"""TokenCut: one object per image by a normalized cut on patch features.

Nodes are patches; A_ij = 1 if cos(f_i, f_j) >= tau else eps.  The generalized
problem (D - A) x = lambda D x is solved through the symmetric normalized
matrix D^-1/2 A D^-1/2 (same eigenvectors after rescaling by D^-1/2), which is
symmetric, so a standard or sparse symmetric solver applies.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from scipy import ndimage
from scipy.sparse.linalg import ArpackError, LinearOperator, eigsh

from mirage.data import schema
from mirage.data.images import decode_png, encode_mask, mask_to_box
from mirage.data.params import Discover, Features
from mirage.data.store import Partial, interruption_point
from mirage.models.devices import compute_dtype, resolve_device
from mirage.models.encoders import Encoder, load_encoder
from mirage.models.fingerprint import encoder_spec, model_fingerprint

DENSE_MAX_NODES = 400  # up to here a dense eigh is faster than ARPACK (0.13 s vs 0.04 s at 1024 nodes)


@dataclass(frozen=True)
class Cut:
    patch_mask: np.ndarray  # bool gh x gw
    eigenvalue: float       # second-smallest generalized eigenvalue (0..1, lower = cleaner cut)


def affinity(features: np.ndarray, tau: float, eps: float) -> np.ndarray:
    """N x C features -> N x N graph: 1 where cosine similarity >= tau, else eps."""
    f = features.astype(np.float32)  # float32 similarities: 2x faster, thresholding is unaffected
    f /= np.linalg.norm(f, axis=1, keepdims=True).clip(1e-12)
    return np.where(f @ f.T >= tau, np.float32(1.0), np.float32(eps))


def fiedler(graph: np.ndarray) -> tuple[np.ndarray, float]:
    """The generalized Fiedler vector x of (D - A) x = lambda D x, with a
    deterministic sign (its largest-magnitude entry positive), and lambda."""
    n = len(graph)
    if n <= DENSE_MAX_NODES:
        mu, v, d_inv_sqrt = _dense_fiedler(graph)
    else:
        # Lanczos (ARPACK) on D^-1/2 A D^-1/2 without forming it: each matvec is
        # s * (A @ (s * x)) on the float32 graph, so the only pass over the N x N
        # matrix is the matvec itself (memory traffic is the cost at 3600 nodes).
        # Its top eigenpair is known exactly (sqrt(d), 1) and deflated implicitly,
        # so ARPACK is asked for one vector with a small Krylov space.
        a = graph if graph.dtype == np.float32 else graph.astype(np.float32)
        d = (a @ np.ones(n, dtype=np.float32)).astype(np.float64)
        d_inv_sqrt = 1.0 / np.sqrt(d)
        s32 = d_inv_sqrt.astype(np.float32)
        top = (np.sqrt(d) / np.linalg.norm(np.sqrt(d))).astype(np.float32)

        def matvec(x: np.ndarray) -> np.ndarray:
            x = x.astype(np.float32).ravel()
            return s32 * (a @ (s32 * x)) - top * (top @ x)

        op = LinearOperator((n, n), matvec=matvec, dtype=np.float32)
        try:
            values, vectors = eigsh(op, k=1, which="LA", v0=np.ones(n, dtype=np.float32), tol=1e-6, ncv=8)
            mu, v = float(values[0]), vectors[:, 0].astype(np.float64)
        except ArpackError:  # e.g. a graph of equal degrees: the deflated start vector is zero
            mu, v, d_inv_sqrt = _dense_fiedler(graph)
    x = v * d_inv_sqrt
    if x[np.argmax(np.abs(x))] < 0:
        x = -x
    return x, float(1.0 - mu)


def _dense_fiedler(graph: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """(mu, v, D^-1/2): the second-largest eigenpair of D^-1/2 A D^-1/2, dense float64."""
    d = graph.sum(1, dtype=np.float64)
    d_inv_sqrt = 1.0 / np.sqrt(d)
    normalized = graph.astype(np.float64) * d_inv_sqrt[:, None] * d_inv_sqrt[None, :]
    values, vectors = np.linalg.eigh(normalized)
    return float(values[-2]), vectors[:, -2], d_inv_sqrt


def second_eigenvector(features: np.ndarray, tau: float, eps: float) -> tuple[np.ndarray, float]:
    """features: N x C -> (Fiedler vector, eigenvalue) of TokenCut's graph."""
    return fiedler(affinity(features, tau, eps))


def corners(mask: np.ndarray) -> int:
    return int(mask[0, 0]) + int(mask[0, -1]) + int(mask[-1, 0]) + int(mask[-1, -1])


def foreground(x: np.ndarray, grid: tuple[int, int], nodes: np.ndarray, corner_rule: bool) -> np.ndarray:
    """Bipartition x > mean(x) on the seed's side (seed: largest |x|; x[seed] > 0
    after the sign fix); with `corner_rule`, a side covering >= 3 of the 4 grid
    corners is background (MaskCut's rule).  Returns the seed's 4-connected component.
    `nodes` are the grid indices of x's entries."""
    side = np.zeros(grid[0] * grid[1], dtype=bool)
    side[nodes] = x > x.mean()
    seed = nodes[int(np.argmax(np.abs(x)))]
    if corner_rule and corners(side.reshape(grid)) >= 3:
        side[nodes] = ~side[nodes]
        seed = nodes[int(np.argmin(x))]
    labels, _ = ndimage.label(side.reshape(grid))
    return labels == labels.flat[seed]


class Graph:
    """TokenCut's graph of one image's patches, and its Fiedler vector on a set
    of them.  `merged`: patches with identical features (the tokens Token
    Merging made one, mapped back to the grid: features.tome_r) are one node
    weighing as many patches, so the solve runs on the merged graph, T' nodes
    instead of P: W'_ab = s_a s_b w(a, b).  Its eigenproblem is the patch
    graph's restricted to vectors equal on each merged token (which the patch
    graph's Fiedler vector is, identical nodes being interchangeable), so the
    cut is the same and its vector is mapped back to the patches."""

    def __init__(self, features: np.ndarray, tau: float, eps: float, merged: bool = False):
        if merged:  # rows compared as raw bytes: 20x faster than np.unique(axis=0) at 3600 x 768
            f = np.ascontiguousarray(features)
            rows = f.view(np.dtype((np.void, f.dtype.itemsize * f.shape[1]))).ravel()
            _, first, self.token = np.unique(rows, return_index=True, return_inverse=True)
            features, self.token = f[first], self.token.reshape(-1)
        else:
            self.token = None
        self.graph = affinity(features, tau, eps)

    def nodes(self, patches: np.ndarray) -> int:
        """How many nodes the graph on `patches` has (merged: their distinct tokens)."""
        return len(patches) if self.token is None else len(np.unique(self.token[patches]))

    def fiedler(self, nodes: np.ndarray) -> tuple[np.ndarray, float]:
        """The Fiedler vector on patches `nodes` (a value per patch) and its eigenvalue."""
        if self.token is None:
            return fiedler(self.graph if len(nodes) == len(self.graph) else self.graph[np.ix_(nodes, nodes)])
        tokens, at, sizes = np.unique(self.token[nodes], return_inverse=True, return_counts=True)
        weights = sizes.astype(np.float32)
        y, value = fiedler(self.graph[np.ix_(tokens, tokens)] * weights[:, None] * weights[None, :])
        return y[at.reshape(-1)], value


def maskcut(
    features: np.ndarray,
    grid: tuple[int, int],
    tau: float,
    eps: float,
    max_objects: int,
    min_area: float = 0.01,
    merged: bool = False,
) -> list[Cut]:
    """Up to `max_objects` cuts: after each, the found patches leave the graph
    and the rest is cut again, so masks never overlap (MaskCut's IoU > 0.5
    filter matters only after pixel-level refinement, which mirage does not
    do).  A mask covering <= `min_area` of the grid is dropped.  `merged`:
    the cuts run on the merged graph (Graph)."""
    graph = Graph(features, tau, eps, merged)
    remaining = np.arange(len(features))
    cuts: list[Cut] = []
    for _ in range(max_objects):
        if graph.nodes(remaining) < 3:
            break
        x, value = graph.fiedler(remaining)
        mask = foreground(x, grid, remaining, corner_rule=max_objects > 1)
        remaining = remaining[~mask.reshape(-1)[remaining]]
        if mask.mean() <= min_area:
            continue
        cuts.append(Cut(patch_mask=mask, eigenvalue=value))
    return cuts


def tokencut(features: np.ndarray, grid: tuple[int, int], tau: float, eps: float, merged: bool = False) -> Cut:
    """TokenCut: the single cut of the full graph, the seed's side and component
    (`merged`: on the merged graph, Graph)."""
    x, value = Graph(features, tau, eps, merged).fiedler(np.arange(len(features)))
    return Cut(patch_mask=foreground(x, grid, np.arange(len(x)), corner_rule=False), eigenvalue=value)


def upsample_mask(patch_mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """Patch grid mask -> pixel mask (nearest; each patch covers its pixel block)."""
    gh, gw = patch_mask.shape
    rows = (np.arange(height) * gh) // height
    cols = (np.arange(width) * gw) // width
    return patch_mask[rows[:, None], cols[None, :]]


def cut_to_object(cut: Cut, height: int, width: int) -> tuple[np.ndarray, list[float]]:
    """Pixel mask and its (x, y, w, h) box."""
    mask = upsample_mask(cut.patch_mask, height, width)
    return mask, mask_to_box(mask)


def zero_shot(encoder: Encoder, images: np.ndarray, boxes: list[list[float]], prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Class index and probability for the crop of each box (x, y, w, h px).
    images: uint8 H x W x 3 each (any sizes)."""
    crops = []
    for img, (x, y, w, h) in zip(images, boxes):
        x0, y0 = int(x), int(y)
        x1, y1 = max(int(x + w), x0 + 1), max(int(y + h), y0 + 1)
        crop = torch.from_numpy(np.array(img[y0:y1, x0:x1])).permute(2, 0, 1)[None].float()
        size = (encoder.image_size, encoder.image_size)
        crops.append(torch.nn.functional.interpolate(crop, size=size, mode="bilinear", align_corners=False)[0])
    batch = torch.stack(crops).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    with torch.inference_mode():
        img_emb, _ = encoder.encode_images(batch, keys=False)
        txt_emb = encoder.encode_text(prompts)
        probs = (encoder.model.logit_scale.exp() * img_emb @ txt_emb.T).softmax(-1).cpu().numpy()
    return probs.argmax(1), probs.max(1)


def discover_objects(features: np.ndarray, grid: tuple[int, int], cfg) -> list[Cut]:
    """The cuts `cfg` (a Discover section) asks for, on one image's N x C patch features."""
    interruption_point("cut")  # a stopped run (Ctrl-C, a cancel) ends here, not at the end of its batch
    if cfg.method == "tokencut":
        return [tokencut(features, grid, cfg.tau, cfg.eps, cfg.on_merged)]
    return maskcut(features, grid, cfg.tau, cfg.eps, cfg.max_objects, cfg.min_area, cfg.on_merged)


VERSION = 5  # 2: float32 similarities; 3: float32 deflated ARPACK solve; 4: naming device/dtype in keys;
# 5: degenerate cuts dropped, images without an object are failed items


def discover_batch(encoder: Encoder, cfg: Discover, grid: tuple[int, int, int], rows: list[dict]) -> pa.Table | Partial:
    """Objects of a batch of images.  An image that cannot be decoded, whose
    patch features are not finite, or where no object is found (every cut
    empty or the whole image) is a failed item: left out, with its reason."""
    gh, gw, c = grid
    errors: dict[str, tuple[str, str]] = {}
    decoded = {}
    for r in rows:
        try:
            decoded[r["key"]] = decode_png(r["image"])
        except Exception as err:  # noqa: BLE001 - PIL raises several types
            errors[r["key"]] = (r["id"], f"cannot be decoded: {type(err).__name__}: {err}")
    found = []  # (row index, box, mask, score)
    cuts_cfg = {m: cfg.model_copy(update={"method": m}) for m in {r.get("method", cfg.method) for r in rows}}
    for i, r in enumerate(rows):
        if r["key"] in errors:
            continue
        feats = r["patches"].astype(np.float32).reshape(gh * gw, c)
        if not np.isfinite(feats).all():
            errors[r["key"]] = (r["id"], "non-finite patch features (NaN or inf)")
            continue
        h, w = decoded[r["key"]].shape[:2]
        kept = 0
        for cut in discover_objects(feats, (gh, gw), cuts_cfg[r.get("method", cfg.method)]):
            mask, box = cut_to_object(cut, h, w)
            if box[2] <= 0 or box[3] <= 0 or mask.all():  # degenerate: nothing, or the whole image
                continue
            found.append((i, box, encode_mask(mask), 1.0 - cut.eigenvalue))
            kept += 1
        if not kept:
            errors[r["key"]] = (r["id"], "no object found (every cut empty or the whole image)")
    prompts = [cfg.prompt_template.format(name) for name in cfg.classes]
    if found and encoder.has_text:
        images = [decoded[rows[f[0]]["key"]] for f in found]  # own sizes: crops are resized
        index, label_scores = zero_shot(encoder, images, [f[1] for f in found], prompts)
        labels = [cfg.classes[int(i)] for i in index]
    else:  # an image-only encoder (a timm ViT) names nothing: label "" with score 0
        labels, label_scores = [""] * len(found), [0.0] * len(found)
    objects: list[list[dict]] = [[] for _ in rows]
    for (i, box, mask, score), lab, ls in zip(found, labels, label_scores):
        objects[i].append({"box": box, "mask": mask, "score": score, "label": lab, "label_score": float(ls)})
    out = [{"key": r["key"], "image_id": r["id"], "prompt_class": r["class_name"], "objects": o}
           for r, o in zip(rows, objects) if r["key"] not in errors]
    table = pa.Table.from_pylist(out, schema=schema.OBJECTS)
    return Partial(table, errors) if errors else table


def coco_detections(rows: list[dict], images: list[dict], classes: tuple[str, ...]) -> dict:
    """The discovered objects as a COCO detection file's content (boxes x, y, w, h px)."""
    objects = [{**o, "image_id": r["image_id"]} for r in rows for o in r["objects"]]
    cats = [{"id": i + 1, "name": n} for i, n in enumerate(classes)]
    if any(o["label"] not in classes for o in objects):  # unnamed (an image-only encoder)
        cats.append({"id": len(classes) + 1, "name": "object"})
    coco = {
        "images": [{"id": i, "file_name": im["id"], "width": im["width"], "height": im["height"]} for i, im in enumerate(images)],
        "categories": cats,
        "annotations": [],
    }
    index = {im["id"]: i for i, im in enumerate(images)}
    for n, o in enumerate(objects):
        x, y, w, h = o["box"]
        coco["annotations"].append({
            "id": n + 1, "image_id": index[o["image_id"]], "category_id": classes.index(o["label"]) + 1 if o["label"] in classes else len(classes) + 1,
            "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0, "score": o["score"],
            "segmentation": {"size": [images[index[o["image_id"]]]["height"], images[index[o["image_id"]]]["width"]], "counts": o["mask"]},
        })
    return coco


@dataclass(frozen=True)
class DiscoverJob:
    """Cuts and zero-shot names, wherever they run (mirage/run/runner.py): the
    encoder (for naming) is loaded once per process; a batch is rows with
    their patches and image."""

    cfg: Discover
    fcfg: Features
    grid: tuple[int, int, int] = (0, 0, 0)

    def load_key(self) -> tuple:
        return ("discover", self.fcfg.encoder, self.fcfg.device, self.fcfg.dtype)

    def load(self) -> Encoder:
        return load_encoder(encoder_spec(self.fcfg.encoder), resolve_device(self.fcfg.device), self.fcfg.dtype)

    def describe(self, encoder: Encoder) -> dict:
        return {"model": model_fingerprint(encoder_spec(self.fcfg.encoder)), "has_text": encoder.has_text,
                "computed_on": (encoder.device.type, compute_dtype(self.fcfg.dtype, encoder.device))}

    def prepare(self, encoder: Encoder, rows: list[dict]) -> list[dict]:
        return rows

    def compute(self, encoder: Encoder, rows: list[dict]) -> pa.Table:
        return discover_batch(encoder, self.cfg, self.grid, rows)


BATCH = 32  # images per discover batch: 10 for the 300 toy images, an even split over Dask workers
