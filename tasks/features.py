"""Global embeddings and patch features of images, batch by batch."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from mirage.data.images import decode_png
from mirage.data.params import Features
from mirage.data.store import OrderedReader, Partial, iter_rows
from mirage.models.devices import compute_dtype, resolve_device
from mirage.models.encoders import ImageEncoder, load_encoder
from mirage.models.fingerprint import encoder_spec, model_fingerprint
from mirage.models.tome import blocks_of
from mirage.models.patch_backbones import EncoderPatches, load_patch_backbone, parse_patch_backbone


def decode_batch(ids: list[str], pngs: list[bytes], pool: ThreadPoolExecutor | None,
                 size: tuple[int, int] | None = None) -> tuple[np.ndarray | None, dict[int, str]]:
    """uint8 N x H x W x 3 of the images that decode, and index -> reason for
    those that do not (corrupt or empty bytes, another size than the rest):
    named, not skipped silently.  With `size` (h, w), images of another size
    are resized to it (imported images beside generated ones)."""
    def one(data: bytes):
        try:
            image = decode_png(data)
        except Exception as err:  # noqa: BLE001 - PIL raises several types
            return f"cannot be decoded: {type(err).__name__}: {err}" if data else "empty image (0 bytes)"
        return image if size is None or image.shape[:2] == tuple(size) else resize(image, size)

    images = list(pool.map(one, pngs)) if pool else [one(p) for p in pngs]
    bad = {i: im for i, im in enumerate(images) if isinstance(im, str)}
    good = [im for im in images if not isinstance(im, str)]
    if good:
        shapes = [im.shape for im in good]
        common = max(set(shapes), key=shapes.count)  # images of one table share a size
        for i, im in enumerate(images):
            if i not in bad and im.shape != common:
                bad[i] = f"size {im.shape[1]}x{im.shape[0]}, not the batch's {common[1]}x{common[0]}"
    kept = [im for i, im in enumerate(images) if i not in bad]
    return (np.stack(kept) if kept else None), bad


def resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 H x W x 3 -> size (h, w), bicubic (the aspect ratio follows the
    size: discovery maps its cuts back to the image's own pixels)."""
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BICUBIC))


def non_finite(*arrays: np.ndarray | None) -> list[int]:
    """Rows (axis 0) holding a NaN or an infinity in any of the arrays."""
    rows: set[int] = set()
    for a in arrays:
        if a is not None:
            rows |= set(np.flatnonzero(~np.isfinite(a.reshape(len(a), -1)).all(axis=1)).tolist())
    return sorted(rows)


def embed_batch(encoder: ImageEncoder, pixels: torch.Tensor, images: np.ndarray, patch_mode: str | None,
                backbone=None, tome_r: int | tuple = 0) -> tuple[np.ndarray, np.ndarray | None]:
    """float16 embeddings N x D (L2-normalised) and, when asked, patch features
    flattened to N x (gh*gw*C): from the encoder's own forward (`keys` /
    `tokens`) or from a separate backbone (the toy UNet, the concepts' units).
    `tome_r`: the encoder's tokens merged per block (features.tome_r)."""
    with torch.inference_mode():
        emb, patches = encoder.forward(pixels, patch_mode if patch_mode in ("keys", "tokens") else None, tome_r)
    emb16 = emb.cpu().numpy().astype(np.float16)
    if patch_mode in SEPARATE:
        feats, _ = backbone.patches(images)
        return emb16, feats.reshape(len(images), -1).astype(np.float16)
    if patches is None:
        return emb16, None
    return emb16, patches.cpu().numpy().reshape(len(images), -1).astype(np.float16)


VERSION = 2
SEPARATE = ("unet", "concepts")  # patch backbones that are not the encoder's own forward


def patch_mode(cfg: Features) -> str | None:
    """None, `keys`, `tokens` (from the encoder's own forward), `unet` or `concepts`."""
    if not cfg.patches:
        return None
    backbone = parse_patch_backbone(cfg.patch_backbone)
    return backbone.kind if backbone.kind in SEPARATE else backbone.part


def encode(encoder: ImageEncoder, mode: str | None, backbone, model_id: str, fschema: pa.Schema, batch,
           tome_r: int | tuple = 0) -> pa.Table | Partial:
    """A prepared batch's rows; items that failed to decode, or whose
    features are not finite, come back as a Partial's errors."""
    specs, images, pixels, errors = batch
    if not specs:
        return Partial(fschema.empty_table(), errors)
    emb, patches = embed_batch(encoder, pixels, images, mode, backbone, tome_r)
    n = len(specs)
    emb, patches = emb[:n], None if patches is None else patches[:n]  # drop the padding
    bad = non_finite(emb, patches)
    if bad:
        errors = errors | {specs[i]["key"]: (specs[i]["id"], "non-finite features (NaN or inf)") for i in bad}
        keep = [i for i in range(n) if i not in bad]
        specs, emb = [specs[i] for i in keep], emb[keep]
        patches = None if patches is None else patches[keep]
    cols = {
        "key": [s["key"] for s in specs],
        "id": [s["id"] for s in specs],
        "model": [model_id] * len(specs),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel(), pa.float16()), emb.shape[1]),
    }
    if patches is not None:
        cols["patches"] = pa.FixedSizeListArray.from_arrays(pa.array(patches.ravel(), pa.float16()), patches.shape[1])
    table = pa.table(cols, schema=fschema)
    return Partial(table, errors) if errors else table


@dataclass
class Loaded:
    encoder: ImageEncoder
    backbone: object | None  # the patch backbone, when it is not the encoder's own forward (SEPARATE)
    decoders: ThreadPoolExecutor | None  # `features.workers` decode threads


@dataclass(frozen=True)
class FeaturesJob:
    """The encoder's batches, wherever they run (mirage/run/runner.py).  A batch is
    (specs, PNG bytes); `schema` and `model_id` come from describe()."""

    cfg: Features
    generator: str  # the generate.model whose UNet a `unet:` patch backbone uses
    concepts: str | None = None  # stage concepts' output (a `concepts` patch backbone's units)
    model_id: str = ""
    schema: pa.Schema | None = None
    size: tuple[int, int] | None = None  # (h, w) every image is brought to: the first image's

    @property
    def batch_param(self) -> tuple[str, int]:
        """The key that sizes a batch (named when one runs out of memory)."""
        return "features.batch_size", self.cfg.batch_size

    def load_key(self) -> tuple:
        c = self.cfg
        return ("features", c.encoder, c.device, c.dtype, patch_mode(c), c.patch_backbone, self.generator,
                self.concepts if patch_mode(c) == "concepts" else None, c.workers)

    def load(self) -> Loaded:
        encoder = load_encoder(encoder_spec(self.cfg.encoder), resolve_device(self.cfg.device), self.cfg.dtype)
        if not self.cfg.merges_nothing:
            blocks_of(encoder.model)  # refuses, naming features.tome_r, a ViT that merging cannot patch
        backbone = (load_patch_backbone(self.cfg.patch_backbone, encoder, self.generator, concepts=self.concepts)
                    if patch_mode(self.cfg) in SEPARATE else None)
        n = self.cfg.workers if self.cfg.workers != "auto" else (2 if encoder.device.type == "cuda" else 0)
        return Loaded(encoder, backbone, ThreadPoolExecutor(n, thread_name_prefix="mirage-decode") if n else None)

    def describe(self, m: Loaded, probe: tuple[str, bytes] | None) -> dict:
        """Identity and shape of what this encoder makes; `probe`: one image
        (id, PNG) to measure the patch grid on."""
        mode = patch_mode(self.cfg)
        facts = {"model": model_fingerprint(encoder_spec(self.cfg.encoder)), "embed_dim": m.encoder.embed_dim,
                 # float32 on a CPU and float16 autocast on a GPU give other bytes: part of every key
                 "computed_on": (m.encoder.device.type, compute_dtype(self.cfg.dtype, m.encoder.device)),
                 # the UNet's identity, when it makes the patches; the concepts' units and the models they are from
                 "patch_id": (model_fingerprint(self.generator) if mode == "unet" else
                              f"{model_fingerprint(self.generator)}/{m.backbone.identity}" if mode == "concepts" else ""),
                 "grid": None}
        if mode and probe:
            image, _ = decode_batch([probe[0]], [probe[1]], None)
            feats, (gh, gw) = (m.backbone if mode in SEPARATE else
                               EncoderPatches(m.encoder, mode, self.cfg.tome_r)).patches(image)
            facts["grid"] = (gh, gw, feats[0].size // (gh * gw))
        return facts

    def prepare(self, m: Loaded, batch: tuple[list[dict], list[bytes]]):
        specs, pngs = batch
        decoded, bad = decode_batch([s["id"] for s in specs], pngs, m.decoders, self.size)
        errors = {specs[i]["key"]: (specs[i]["id"], why) for i, why in bad.items()}
        specs = [s for i, s in enumerate(specs) if i not in bad]
        if decoded is None:
            return specs, None, None, errors
        pad = self.cfg.batch_size - len(decoded)  # one batch shape: an item's bytes never depend on its batch
        if pad > 0:
            decoded = np.concatenate([decoded, np.repeat(decoded[-1:], pad, axis=0)])
        return specs, decoded, m.encoder.prepare(decoded), errors

    def compute(self, m: Loaded, prepared) -> pa.Table:
        return encode(m.encoder, patch_mode(self.cfg), m.backbone, self.model_id, self.schema, prepared, self.cfg.tome_r)


def first_decodable(tables: list[str]) -> tuple[str, bytes] | None:
    """(id, PNG) of the first image that decodes: the patch grid is measured
    on it, and images of another size are resized to its size."""
    for images in tables:
        for row in iter_rows(images, ["id", "image"], batch_rows=16):
            if not decode_batch([row["id"]], [row["image"]], None)[1]:
                return row["id"], row["image"]
    return None


class TablesReader:
    """Images of several tables by (table, key), each table read in its own order."""

    def __init__(self, tables: list[str]):
        self.readers = [OrderedReader(t, ["image"]) for t in tables]

    def take(self, specs: list[dict]) -> list[bytes]:
        rows = {}
        for t, reader in enumerate(self.readers):
            keys = [s["src"] for s in specs if s["table"] == t]
            rows |= {(t, r["key"]): r["image"] for r in reader.take(keys)}
        return [rows[(s["table"], s["src"])] for s in specs]
