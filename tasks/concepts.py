"""Rosetta Neurons: units of the generator and of the encoder that fire together.

Dravid et al. (ICCV 2023): run the generated images through both models, keep
every unit's activation map, correlate every generator unit with every
encoder unit over images x positions (Pearson), and pair the units that are
each other's best match ("best buddies").  mirage adds what makes it a
measurement: the same with random-weight twins and with shuffled image
pairing, split-half stability, and mask IoU / AUROC of each pair's maps
against the toy world's ground-truth objects.

Activation maps (float32, B x units x grid x grid):
- the generator: the outputs of `concepts.generator_layers` (every resnet of
  the UNet when empty) for the image noised to `concepts.timestep` with the
  "no class" label or the empty prompt: the UNet patch backbone's recipe
  (DDAE).  Stable Diffusion's UNet sees the VAE's latents.
- an encoder: each block's MLP activation (after its nonlinearity), the
  class and register tokens dropped, the tokens laid out on the patch grid.
Each map is resized to `grid x grid` (bilinear; antialiased when shrinking).

Statistics: per chunk of images (one store item), float64 moments: each
unit's mean and centred sum of squares and the centred cross-moment matrix
(units_A x units_B, kept as float32 in the row).  Within a chunk the sums are
taken about the first batch's means (so Σx² − nμ² does not cancel); chunks
combine exactly (Chan et al.'s pairwise update), so a run with more images
computes only the new images' chunks.  Memory is O(units_A x units_B), never
O(images).  Each chunk holds four sets per encoder: the two halves of its
images (by item key; the union is the full set, the halves give stability),
shuffled pairing (generator on image i, encoder on the image before it in
key-hash order) and the random-weight twins.
"""
from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from mirage.data.images import decode_png
from mirage.data.params import Concepts
from mirage.data.store import interruption_point
from mirage.models.devices import MODEL_BUILD, resolve_device
from mirage.models.encoders import ImageEncoder, TimmEncoder, load_encoder, random_twin
from mirage.models.fingerprint import encoder_spec, model_fingerprint
from mirage.models.generators import load_generator

VERSION = 1
SETS = ("half0", "half1", "shuffled", "random")
BATCH = 1  # chunks per store batch: a chunk is already `concepts.chunk` images

CHUNKS = pa.schema([
    ("key", pa.string()),
    ("items", pa.list_(pa.string())),  # the item keys of the chunk's images
    ("moments", pa.binary()),           # npz: SET/MODEL/{n,mean_a,mean_b,m2_a,m2_b,cross} (see Moments)
])

PAIRS = pa.schema([
    ("model", pa.string()),             # the encoder of the pair (the generator is the hub)
    ("condition", pa.string()),         # trained, random or shuffled
    ("generator_layer", pa.string()),
    ("generator_unit", pa.int32()),
    ("encoder_layer", pa.string()),
    ("encoder_unit", pa.int32()),
    ("corr", pa.float32()),             # Pearson r over generated images x positions
    ("concept", pa.int32()),            # cluster of the pair's mean maps (trained pairs; -1 otherwise)
    ("test_iou", pa.float32()),         # mean mask IoU on the test split (the pair's map, top q of positions)
    ("test_auroc", pa.float32()),
    ("ood_iou", pa.float32()),
    ("ood_auroc", pa.float32()),
])


# ---------------------------------------------------------------- activation maps

def resize_maps(maps: torch.Tensor, grid: int) -> torch.Tensor:
    """B x C x h x w -> B x C x grid x grid float32 (bilinear, antialiased when shrinking)."""
    maps = maps.float()
    if maps.shape[-2:] == (grid, grid):
        return maps
    return F.interpolate(maps, size=(grid, grid), mode="bilinear", align_corners=False,
                         antialias=maps.shape[-1] > grid or maps.shape[-2] > grid)


class Units:
    """A model's units: `layers` [(name, units)] in column order, and `maps(images)`."""

    layers: list[tuple[str, int]]

    @property
    def count(self) -> int:
        return sum(n for _, n in self.layers)

    def unit_name(self, column: int) -> tuple[str, int]:
        for name, n in self.layers:
            if column < n:
                return name, column
            column -= n
        raise IndexError(column)

    def maps(self, images: np.ndarray) -> torch.Tensor:
        raise NotImplementedError


def _hooked(modules: list[torch.nn.Module], run, transform) -> list[torch.Tensor]:
    """Run `run()` with a forward hook on each module; each output through `transform`."""
    captured: dict[int, torch.Tensor] = {}
    handles = [m.register_forward_hook(lambda _m, _i, out, i=i: captured.__setitem__(
        i, transform(out[0] if isinstance(out, tuple) else out))) for i, m in enumerate(modules)]
    try:
        with torch.inference_mode():
            run()
    finally:
        for h in handles:
            h.remove()
    return [captured[i] for i in range(len(modules))]


class GeneratorUnits(Units):
    """The generator's denoiser on the noised image: the toy UNet (class
    "no class") or a text-to-image pipeline's UNet (empty prompt, VAE latents)."""

    def __init__(self, spec: str, layers: tuple[str, ...], timestep: int, noise_seed: int, grid: int,
                 device: torch.device, random_seed: int | None = None):
        gen = load_generator(spec, str(device))
        if gen.kind == "dit":
            raise ValueError(f"generate.model {spec!r}: a DiT generator's units are not supported by stage concepts "
                             "(a UNet pipeline is: the toy one, Stable Diffusion)")
        self.pipe, self.kind, self.device, self.grid = gen.pipe, gen.kind, device, grid
        unet = self.pipe.unet
        if random_seed is not None:  # the same architecture, random weights: the control
            torch.manual_seed(random_seed)
            unet = type(unet).from_config(unet.config).to(device)
        self.unet = unet.eval()
        names = list(layers) or [n for n, m in unet.named_modules() if n.rsplit(".", 2)[-2:-1] == ["resnets"]]
        try:
            self.modules = [unet.get_submodule(n) for n in names]
        except AttributeError as err:
            raise ValueError(f"concepts.generator_layers: the UNet has no module {err}") from None
        from diffusers import DDPMScheduler

        self.scheduler = DDPMScheduler.from_config(self.pipe.scheduler.config)
        self.timestep, self.noise_seed = timestep, noise_seed
        self.layers = list(zip(names, (self._channels(m) for m in self.modules)))
        if self.kind == "toy":
            self.size = int(unet.config.sample_size)
            self.cond = None
        else:
            self.size = int(unet.config.sample_size) * self.pipe.vae_scale_factor
            tok = self.pipe.tokenizer([""], padding="max_length", max_length=self.pipe.tokenizer.model_max_length,
                                      return_tensors="pt")
            with torch.inference_mode():
                self.cond = self.pipe.text_encoder(tok.input_ids.to(device))[0]

    @staticmethod
    def _channels(module: torch.nn.Module) -> int:
        for attr in ("out_channels", "conv2"):
            value = getattr(module, attr, None)
            if isinstance(value, int):
                return value
            if isinstance(value, torch.nn.Conv2d):
                return value.out_channels
        raise ValueError(f"concepts.generator_layers: cannot tell the channels of {type(module).__name__}")

    def maps(self, images: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device).permute(0, 3, 1, 2).float() / 127.5 - 1
        if x.shape[-1] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        if self.kind != "toy":
            with torch.inference_mode():
                x = self.pipe.vae.encode(x.to(self.pipe.vae.dtype)).latent_dist.mean * self.pipe.vae.config.scaling_factor
        noise = torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(self.noise_seed)).to(self.device)
        t = torch.full((len(x),), self.timestep, dtype=torch.long, device=self.device)
        noisy = self.scheduler.add_noise(x, noise.expand_as(x).to(x.dtype), t)

        def run():
            if self.kind == "toy":
                labels = torch.full((len(x),), self.pipe.null_class, device=self.device)
                self.unet(noisy, t, class_labels=labels)
            else:
                self.unet(noisy.to(self.unet.dtype), t, encoder_hidden_states=self.cond.expand(len(x), -1, -1))

        outs = _hooked(self.modules, run, lambda out: resize_maps(out, self.grid))
        return torch.cat(outs, dim=1)


class EncoderUnits(Units):
    """Each block's MLP activation of an open_clip or timm ViT, on the patch grid."""

    def __init__(self, encoder: ImageEncoder, layers: tuple[int, ...], grid: int):
        self.encoder, self.grid = encoder, grid
        blocks = (list(encoder.model.blocks) if isinstance(encoder, TimmEncoder)
                  else list(encoder.model.visual.transformer.resblocks))
        index = list(layers) or list(range(len(blocks)))
        if any(not -len(blocks) <= i < len(blocks) for i in index):
            raise ValueError(f"concepts.encoder_layers: {list(layers)} out of range for {encoder.name!r} "
                             f"({len(blocks)} blocks)")
        self.index = [i % len(blocks) for i in index]
        acts = [blocks[i].mlp.act if isinstance(encoder, TimmEncoder) else blocks[i].mlp.gelu for i in self.index]
        fc = [blocks[i].mlp.fc1 if isinstance(encoder, TimmEncoder) else blocks[i].mlp.c_fc for i in self.index]
        self.modules = acts
        self.layers = [(f"block{i}.mlp", f.out_features) for i, f in zip(self.index, fc)]

    def _grid(self, tokens: torch.Tensor) -> torch.Tensor:
        gh, gw = self.encoder.patch_grid
        t = tokens[:, self.encoder.num_prefix_tokens:].float()  # B x T x C, batch-first in open_clip 3 and timm
        return resize_maps(t.reshape(len(t), gh, gw, -1).permute(0, 3, 1, 2), self.grid)

    def maps(self, images: np.ndarray) -> torch.Tensor:
        x = self.encoder.preprocess(images)
        outs = _hooked(self.modules, lambda: self.encoder.model.encode_image(x) if hasattr(self.encoder.model, "encode_image")
                       else self.encoder.model.forward_features(x), self._grid)
        return torch.cat(outs, dim=1)


# ---------------------------------------------------------------- moments

@dataclass
class Moments:
    """Correlation-ready statistics of two models' units over n rows (image x position)."""

    n: int
    mean_a: np.ndarray  # float64 units_A
    mean_b: np.ndarray
    m2_a: np.ndarray    # float64 units_A: Σ (x - mean)²
    m2_b: np.ndarray
    cross: np.ndarray   # units_A x units_B: Σ (x_a - mean_a)(x_b - mean_b)

    @staticmethod
    def combine(parts: list["Moments"]) -> "Moments":
        """The moments of the union of disjoint row sets (exact: Chan et al.)."""
        parts = [p for p in parts if p.n]
        if not parts:
            raise ValueError("no rows to combine")
        n = sum(p.n for p in parts)
        mean_a = sum(p.n * p.mean_a for p in parts) / n
        mean_b = sum(p.n * p.mean_b for p in parts) / n
        m2_a = sum(p.m2_a + p.n * (p.mean_a - mean_a) ** 2 for p in parts)
        m2_b = sum(p.m2_b + p.n * (p.mean_b - mean_b) ** 2 for p in parts)
        cross = np.zeros((len(mean_a), len(mean_b)))
        for p in parts:
            cross += p.cross
            cross += p.n * np.outer(p.mean_a - mean_a, p.mean_b - mean_b)
        return Moments(n, mean_a, mean_b, m2_a, m2_b, cross)

    def correlation(self) -> np.ndarray:
        """Pearson r, float32 units_A x units_B; 0 for a unit that never varies."""
        sa, sb = np.sqrt(self.m2_a), np.sqrt(self.m2_b)
        denom = np.outer(sa, sb)
        with np.errstate(invalid="ignore", divide="ignore"):
            r = np.where(denom > 1e-12 * max(self.n, 1), self.cross / denom, 0.0)
        return np.clip(r, -1, 1).astype(np.float32)

    def std_a(self) -> np.ndarray:
        return np.sqrt(self.m2_a / max(self.n - 1, 1))

    def std_b(self) -> np.ndarray:
        return np.sqrt(self.m2_b / max(self.n - 1, 1))


class Accumulator:
    """Streaming Moments: float64 sums about a shift (the first batch's means)."""

    def __init__(self):
        self.n = 0

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """a: rows x units_A, b: rows x units_B (the same rows: image x position)."""
        if not len(a):
            return
        a, b = a.double(), b.double()
        if self.n == 0:
            self.shift_a, self.shift_b = a.mean(0), b.mean(0)
            self.s_a, self.s_b = torch.zeros_like(self.shift_a), torch.zeros_like(self.shift_b)
            self.q_a, self.q_b = torch.zeros_like(self.s_a), torch.zeros_like(self.s_b)
            self.sxy = torch.zeros(len(self.s_a), len(self.s_b), dtype=torch.float64, device=a.device)
        a, b = a - self.shift_a, b - self.shift_b
        self.n += len(a)
        self.s_a += a.sum(0)
        self.s_b += b.sum(0)
        self.q_a += (a * a).sum(0)
        self.q_b += (b * b).sum(0)
        self.sxy.addmm_(a.T, b)

    def moments(self, units_a: int, units_b: int) -> Moments:
        if self.n == 0:
            return Moments(0, np.zeros(units_a), np.zeros(units_b), np.zeros(units_a), np.zeros(units_b),
                           np.zeros((units_a, units_b)))
        n = self.n
        s_a, s_b = self.s_a.cpu().numpy(), self.s_b.cpu().numpy()
        return Moments(n, self.shift_a.cpu().numpy() + s_a / n, self.shift_b.cpu().numpy() + s_b / n,
                       self.q_a.cpu().numpy() - s_a * s_a / n, self.q_b.cpu().numpy() - s_b * s_b / n,
                       self.sxy.cpu().numpy() - np.outer(s_a, s_b) / n)


def moments_bytes(sets: dict[str, Moments]) -> bytes:
    """npz of every set's moments (cross as float32: r needs no more)."""
    arrays = {}
    for name, m in sets.items():
        arrays |= {f"{name}/n": np.array(m.n), f"{name}/mean_a": m.mean_a, f"{name}/mean_b": m.mean_b,
                   f"{name}/m2_a": m.m2_a, f"{name}/m2_b": m.m2_b, f"{name}/cross": m.cross.astype(np.float32)}
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def moments_from_bytes(blob: bytes) -> dict[str, Moments]:
    with np.load(io.BytesIO(blob)) as z:
        names = sorted({k.rsplit("/", 1)[0] for k in z.files})
        return {n: Moments(int(z[f"{n}/n"]), z[f"{n}/mean_a"], z[f"{n}/mean_b"], z[f"{n}/m2_a"], z[f"{n}/m2_b"],
                           z[f"{n}/cross"].astype(np.float64)) for n in names}


def rows(maps: torch.Tensor) -> torch.Tensor:
    """B x U x g x g -> (B * g * g) x U: one row per image and position."""
    return maps.permute(0, 2, 3, 1).reshape(-1, maps.shape[1])


def key_order(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def half_of(key: str) -> int:
    """Which half an image is in for the stability check: a bit of its key's hash."""
    return int(key_order(key)[-1], 16) & 1


# ---------------------------------------------------------------- the models of a run

@dataclass
class Models:
    """The hub (generator) and every encoder, each trained and as its random-weight twin."""

    generator: GeneratorUnits
    random_generator: GeneratorUnits
    encoders: dict[str, EncoderUnits]          # name (the spec as configured) -> units
    random_encoders: dict[str, EncoderUnits]


def load_models(cfg: Concepts, generator: str, encoders: list[str], device: torch.device) -> Models:
    with MODEL_BUILD:  # the random twins are built here too
        return _load_models(cfg, generator, encoders, device)


def _load_models(cfg: Concepts, generator: str, encoders: list[str], device: torch.device) -> Models:
    gen = GeneratorUnits(generator, cfg.generator_layers, cfg.timestep, cfg.noise_seed, cfg.grid, device)
    rgen = GeneratorUnits(generator, cfg.generator_layers, cfg.timestep, cfg.noise_seed, cfg.grid, device,
                          random_seed=cfg.random_seed)
    enc, renc = {}, {}
    for name in encoders:
        spec = encoder_spec(name)
        enc[name] = EncoderUnits(load_encoder(spec, device), cfg.encoder_layers, cfg.grid)
        renc[name] = EncoderUnits(load_encoder(random_twin(spec, cfg.random_seed), device), cfg.encoder_layers, cfg.grid)
    return Models(gen, rgen, enc, renc)


def chunk_moments(models: Models, images: list[tuple[str, np.ndarray]], batch_size: int) -> dict[str, Moments]:
    """Every set's moments over one chunk's images [(item key, uint8 H x W x 3)].

    Images are visited in key-hash order; the shuffled set pairs the generator
    on image i with the encoder on image i - 1 of that order (n - 1 images)."""
    images = sorted(images, key=lambda kv: key_order(kv[0]))
    acc = {(s, m): Accumulator() for s in SETS for m in models.encoders}
    previous: dict[str, torch.Tensor] = {}  # the last image's encoder maps, for the shuffled pairing
    for start in range(0, len(images), batch_size):
        interruption_point("concepts-batch")
        part = images[start : start + batch_size]
        pixels = np.stack([im for _, im in part])
        halves = torch.tensor([half_of(k) for k, _ in part])
        g = models.generator.maps(pixels)
        rg = models.random_generator.maps(pixels)
        for name, units in models.encoders.items():
            e = units.maps(pixels)
            for h in (0, 1):
                sel = halves == h
                acc[f"half{h}", name].add(rows(g[sel]), rows(e[sel]))
            shifted = torch.cat([previous[name], e[:-1]]) if name in previous else e[:-1]
            acc["shuffled", name].add(rows(g if name in previous else g[1:]), rows(shifted))
            previous[name] = e[-1:]
            acc["random", name].add(rows(rg), rows(models.random_encoders[name].maps(pixels)))
    ua = models.generator.count
    return {f"{s}/{m}": acc[s, m].moments(ua, models.encoders[m].count) for s, m in acc}


# ---------------------------------------------------------------- best buddies

@dataclass(frozen=True)
class Buddies:
    a: np.ndarray  # generator columns
    b: np.ndarray  # encoder columns
    r: np.ndarray  # their correlation
    best: float    # mean over generator units of their best r (a threshold-free summary)

    def pairs(self) -> set[tuple[int, int]]:
        return set(zip(self.a.tolist(), self.b.tolist()))


def best_buddies(corr: np.ndarray, top_k: int, min_corr: float) -> Buddies:
    """(a, b) with b = a's best match and a among the top_k of b's column, r >= min_corr."""
    best_b = corr.argmax(1)
    k = min(top_k, corr.shape[0])
    top_a = np.argpartition(-corr, k - 1, axis=0)[:k]  # k x units_B, unordered
    a = np.arange(corr.shape[0])
    r = corr[a, best_b]
    keep = (top_a[:, best_b] == a).any(0) & (r >= min_corr)
    return Buddies(a[keep], best_b[keep], r[keep], float(r.mean()) if len(r) else 0.0)


def jaccard(x: set, y: set) -> float:
    return len(x & y) / len(x | y) if x | y else 1.0


# ---------------------------------------------------------------- ground truth

AUROC_BINS = np.linspace(-8, 8, 321)  # z-units: the pair maps' scores, histogrammed for a streaming AUROC


def foreground_masks(scenes: list[dict]) -> np.ndarray:
    """bool N x H x W: the union of each scene's object masks."""
    from pycocotools import mask as mask_utils

    out = []
    for s in scenes:
        fg = np.zeros((s["height"], s["width"]), dtype=bool)
        for o in s["objects"]:
            fg |= mask_utils.decode({"size": [s["height"], s["width"]], "counts": o["mask"].encode()}).astype(bool)
        out.append(fg)
    return np.stack(out)


@dataclass
class MaskScores:
    """Streaming mask IoU and AUROC of P pair maps against the foreground."""

    pairs: int
    iou_sum: np.ndarray = None
    images: int = 0
    pos: np.ndarray = None
    neg: np.ndarray = None

    def __post_init__(self):
        self.iou_sum = np.zeros(self.pairs)
        self.pos = np.zeros((self.pairs, len(AUROC_BINS) + 1))
        self.neg = np.zeros((self.pairs, len(AUROC_BINS) + 1))

    def add(self, pair_maps: torch.Tensor, fg: np.ndarray, top_q: float) -> None:
        """pair_maps: B x P x H x W (z-units), fg: bool B x H x W."""
        b, p, h, w = pair_maps.shape
        flat = pair_maps.reshape(b, p, h * w)
        k = max(1, math.ceil(top_q * h * w))
        thresh = flat.topk(k, dim=2).values[..., -1:]
        pred = (flat >= thresh).cpu().numpy()
        truth = fg.reshape(b, 1, h * w)
        inter = (pred & truth).sum(2)
        union = (pred | truth).sum(2)
        has = truth.any(2)[:, 0]
        self.iou_sum += (inter[has] / np.maximum(union[has], 1)).sum(0)
        self.images += int(has.sum())
        bins = np.digitize(flat.cpu().numpy(), AUROC_BINS)  # B x P x HW in 0..len(AUROC_BINS)
        for j in range(p):
            self.pos[j] += np.bincount(bins[:, j][truth[:, 0]], minlength=len(AUROC_BINS) + 1)
            self.neg[j] += np.bincount(bins[:, j][~truth[:, 0]], minlength=len(AUROC_BINS) + 1)

    def iou(self) -> np.ndarray:
        return self.iou_sum / max(self.images, 1)

    def auroc(self) -> np.ndarray:
        """P(score of a foreground pixel > a background one), ties counted half."""
        pos, neg = self.pos, self.neg
        below = np.cumsum(neg, axis=1) - neg  # negatives in lower bins
        total = pos.sum(1) * neg.sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(total > 0, (pos * (below + 0.5 * neg)).sum(1) / total, 0.5)


def pair_maps(g: torch.Tensor, e: torch.Tensor, buddies: Buddies, stats: Moments, size: tuple[int, int]) -> torch.Tensor:
    """The mean of a pair's two z-scored maps (z by the generated images'
    statistics), upsampled to the image: B x P x H x W."""
    za = (g[:, buddies.a] - torch.from_numpy(stats.mean_a[buddies.a]).float()[None, :, None, None]) / \
        torch.from_numpy(stats.std_a()[buddies.a]).float().clamp_min(1e-6)[None, :, None, None]
    zb = (e[:, buddies.b] - torch.from_numpy(stats.mean_b[buddies.b]).float()[None, :, None, None]) / \
        torch.from_numpy(stats.std_b()[buddies.b]).float().clamp_min(1e-6)[None, :, None, None]
    return F.interpolate((za + zb) / 2, size=size, mode="bilinear", align_corners=False)


def ground_truth(gen: GeneratorUnits, enc: EncoderUnits, buddies: Buddies, stats: Moments, scenes: list[dict],
                 top_q: float, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Each pair's mean mask IoU and AUROC over the scenes (their object masks)."""
    scores = MaskScores(len(buddies.a))
    if not len(buddies.a) or not scenes:
        return scores.iou(), scores.auroc()
    for start in range(0, len(scenes), batch_size):
        part = scenes[start : start + batch_size]
        pixels = np.stack([decode_png(s["image"]) for s in part])
        fg = foreground_masks(part)
        maps = pair_maps(gen.maps(pixels).cpu(), enc.maps(pixels).cpu(), buddies, stats, fg.shape[1:])
        scores.add(maps, fg, top_q)
    return scores.iou(), scores.auroc()


# ---------------------------------------------------------------- concepts and pictures

def cluster_pairs(gen_maps: torch.Tensor, enc_maps: torch.Tensor, buddies: Buddies, stats: Moments, k: int,
                  seed: int) -> np.ndarray:
    """Concept id per pair: k-means of the pairs' z-scored mean maps over sample images."""
    p = len(buddies.a)
    if p == 0:
        return np.zeros(0, dtype=np.int32)
    maps = pair_maps(gen_maps, enc_maps, buddies, stats, gen_maps.shape[-2:])  # B x P x g x g
    x = maps.permute(1, 0, 2, 3).reshape(p, -1).double().numpy()
    x /= np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)
    k = min(k, p)
    if k == 1:
        return np.zeros(p, dtype=np.int32)
    from sklearn.cluster import KMeans

    return KMeans(n_clusters=k, n_init=4, random_state=seed).fit_predict(x).astype(np.int32)


def _heat(z: np.ndarray) -> np.ndarray:
    """z-scores H x W -> RGB uint8: blue (-3) through white (0) to red (+3)."""
    t = np.clip(z / 3, -1, 1)[..., None]
    red, blue, white = np.array([214, 39, 40]), np.array([31, 119, 180]), np.array([255, 255, 255])
    return np.where(t >= 0, white + t * (red - white), white - t * (blue - white)).astype(np.uint8)


def concepts_png(images: np.ndarray, gen_maps: torch.Tensor, enc_maps: torch.Tensor, shown: list[dict],
                 stats: Moments, scale: int = 3) -> bytes:
    """One row per shown concept: for each image, the image, the generator
    unit's z-map and the encoder unit's z-map over it.  `shown`: dicts with
    a, b (columns), label (text)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=11)
    n_img = len(images)
    h, w = images.shape[1:3]
    cell, pad, label_h = h * scale, 4, 14
    group = 3 * (cell + pad) + 10  # one image's three tiles and a gap
    width = n_img * group + pad
    rows_h = label_h + cell + pad
    canvas = Image.new("RGB", (width, max(1, len(shown)) * rows_h + pad + 16), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, 2), "each image: the image | generator unit | encoder unit (z-score, blue -3 .. red +3)",
              fill=(40, 40, 40), font=font)
    if not shown:
        draw.text((pad, 20), "no best-buddy pairs", fill=(150, 0, 0), font=font)
    for row, c in enumerate(shown):
        y = 16 + row * rows_h
        draw.text((pad, y), c["label"], fill=(40, 40, 40), font=font)
        za = ((gen_maps[:, c["a"]] - stats.mean_a[c["a"]]) / max(stats.std_a()[c["a"]], 1e-6))
        zb = ((enc_maps[:, c["b"]] - stats.mean_b[c["b"]]) / max(stats.std_b()[c["b"]], 1e-6))
        za = F.interpolate(za[:, None].float(), size=(h, w), mode="bilinear", align_corners=False)[:, 0].numpy()
        zb = F.interpolate(zb[:, None].float(), size=(h, w), mode="bilinear", align_corners=False)[:, 0].numpy()
        for i in range(n_img):
            x = pad + i * group
            for j, tile in enumerate((images[i], _heat(za[i]), _heat(zb[i]))):
                im = Image.fromarray(tile).resize((cell, cell), Image.NEAREST)
                canvas.paste(im, (x + j * (cell + pad), y + label_h))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


# ---------------------------------------------------------------- the job (mirage/run/runner.py)

@dataclass(frozen=True)
class ConceptsJob:
    """A chunk's moments wherever it runs: the models are loaded once per process."""

    cfg: Concepts
    generator: str
    encoders: tuple[str, ...]
    device: str = "auto"
    batch_size: int = 32

    def load_key(self) -> tuple:
        return ("concepts", self.generator, self.encoders, self.cfg.digest(), self.device)

    def load(self) -> Models:
        return load_models(self.cfg, self.generator, list(self.encoders), resolve_device(self.device))

    def describe(self, models: Models) -> dict:
        return {"generator": model_fingerprint(self.generator), "device": models.generator.device.type,
                "encoders": [model_fingerprint(encoder_spec(e)) for e in self.encoders],
                "units": {"generator": models.generator.layers,
                          **{n: u.layers for n, u in models.encoders.items()}}}

    def prepare(self, models: Models, batch: list[dict]) -> list[dict]:
        return [{**c, "images": [(k, decode_png(png)) for k, png in c["images"]]} for c in batch]

    def compute(self, models: Models, batch: list[dict]) -> pa.Table:
        out = []
        for c in batch:
            sets = chunk_moments(models, c["images"], self.batch_size)
            out.append({"key": c["key"], "items": [k for k, _ in c["images"]], "moments": moments_bytes(sets)})
        return pa.Table.from_pylist(out, schema=CHUNKS)


MAX_MOMENT_BYTES = 8 << 30  # float64 moments of one chunk, every set and encoder: more is a layer choice to make


def check_memory(units: dict[str, list[tuple[str, int]]]) -> None:
    """Refuse, before any work, unit counts whose moments would not fit (names the keys to change)."""
    gen = sum(n for _, n in units["generator"])
    need = sum(8 * len(SETS) * gen * sum(n for _, n in layers) for name, layers in units.items() if name != "generator")
    if need > MAX_MOMENT_BYTES:
        counts = ", ".join(f"{name} {sum(n for _, n in layers)}" for name, layers in units.items())
        raise ValueError(f"concepts.generator_layers / concepts.encoder_layers: the moments of {counts} units need "
                         f"{need / 2**30:.1f} GiB (at most {MAX_MOMENT_BYTES / 2**30:.0f}): keep fewer layers")


def plan_chunks(keys: list[str], previous: list[list[str]], size: int) -> list[list[str]]:
    """Chunks of image keys for this run: every previous full chunk whose
    images are all still wanted stays as it was (its moments are reused);
    the other images, in table order, make new chunks of `size`."""
    wanted = set(keys)
    kept = [c for c in previous if len(c) == size and set(c) <= wanted]
    taken = {k for c in kept for k in c}
    rest = [k for k in keys if k not in taken]
    return kept + [rest[i : i + size] for i in range(0, len(rest), size)]


# ---------------------------------------------------------------- the measures of a run

CONDITIONS = ("trained", "random", "shuffled")


def combined(chunks: list[dict[str, Moments]], model: str) -> dict[str, Moments]:
    """One model's sets over every chunk: trained (both halves), half0, half1, shuffled, random."""
    sets = {s: Moments.combine([c[f"{s}/{model}"] for c in chunks]) for s in SETS}
    return {"trained": Moments.combine([sets["half0"], sets["half1"]]), **sets}


def split_measures(iou: np.ndarray, auroc: np.ndarray, object_iou: float) -> dict:
    if not len(iou):
        return {"object_concepts": 0, "best_iou": 0.0, "mean_iou": 0.0, "best_auroc": 0.5, "mean_auroc": 0.5}
    return {"object_concepts": int((iou >= object_iou).sum()), "best_iou": float(iou.max()),
            "mean_iou": float(iou.mean()), "best_auroc": float(auroc.max()), "mean_auroc": float(auroc.mean())}


def measure(cfg: Concepts, models: Models, chunks: list[dict[str, Moments]], splits: dict[str, list[dict]],
            sample: np.ndarray) -> tuple[dict, pa.Table, bytes]:
    """Best buddies per encoder and condition, their ground-truth scores on
    each split, the concepts (clusters of the trained pairs of the first
    encoder) and their picture.  `sample`: uint8 generated images for the
    clusters and the picture.  Returns (measures, pairs table, PNG)."""
    rows_out, entries, hubs = [], [], []
    first = next(iter(models.encoders))
    pictures = None
    for name, units in models.encoders.items():
        sets = combined(chunks, name)
        entry: dict = {"model": name, "units": units.count}
        for condition in CONDITIONS:
            buddies = best_buddies(sets[condition].correlation(), cfg.top_k, cfg.min_corr)
            # shuffled pairs are found on mismatched images but scored with the models' own maps
            gen = models.random_generator if condition == "random" else models.generator
            enc = models.random_encoders[name] if condition == "random" else units
            stats = sets[condition]
            scores = {split: ground_truth(gen, enc, buddies, stats, scenes, cfg.top_q, cfg.batch_size)
                      for split, scenes in splits.items()}
            entry[condition] = {"best_buddies": len(buddies.a), "mean_corr": float(buddies.r.mean()) if len(buddies.a) else 0.0,
                                "mean_best_corr": buddies.best,
                                **{split: split_measures(*scores[split], cfg.object_iou) for split in splits}}
            concept = np.full(len(buddies.a), -1, dtype=np.int32)
            if condition == "trained":
                hubs.append(set(buddies.a.tolist()))
                if name == first:
                    g, e = models.generator.maps(sample).cpu(), units.maps(sample).cpu()
                    concept = cluster_pairs(g, e, buddies, stats, cfg.clusters, cfg.random_seed)
                    pictures = (g, e, buddies, concept, stats)
            for j in range(len(buddies.a)):
                gl, gu = models.generator.unit_name(int(buddies.a[j]))
                el, eu = units.unit_name(int(buddies.b[j]))
                row = {"model": name, "condition": condition, "generator_layer": gl, "generator_unit": gu,
                       "encoder_layer": el, "encoder_unit": eu, "corr": float(buddies.r[j]), "concept": int(concept[j])}
                for split in ("test", "ood"):
                    iou, auroc = scores.get(split, (None, None))
                    row[f"{split}_iou"] = float(iou[j]) if iou is not None else None
                    row[f"{split}_auroc"] = float(auroc[j]) if auroc is not None else None
                rows_out.append(row)
        halves = [best_buddies(sets[h].correlation(), cfg.top_k, cfg.min_corr).pairs() for h in ("half0", "half1")]
        entry["stability"] = {"jaccard": jaccard(*halves), "half0": len(halves[0]), "half1": len(halves[1]),
                              "images": [sets["half0"].n // cfg.grid ** 2, sets["half1"].n // cfg.grid ** 2]}
        entries.append(entry)
    # the first encoder's measures at the top; the zoo's other encoders each in `zoo`
    result = {k: entries[0][k] for k in ("model", "units", *CONDITIONS, "stability")} | {"zoo": entries[1:]}
    result["generator_units"] = models.generator.count
    result["rosetta_units"] = len(set.intersection(*hubs)) if hubs else 0  # a buddy in every encoder
    g, e, buddies, concept, stats = pictures
    result["concepts"] = int(len(set(concept.tolist())))
    shown = []
    for c in sorted(set(concept.tolist()), key=lambda c: -float(buddies.r[concept == c].max()))[: cfg.plot_concepts]:
        j = int(np.flatnonzero(concept == c)[np.argmax(buddies.r[concept == c])])
        gl, gu = models.generator.unit_name(int(buddies.a[j]))
        el, eu = models.encoders[first].unit_name(int(buddies.b[j]))
        shown.append({"a": int(buddies.a[j]), "b": int(buddies.b[j]),
                      "label": f"concept {c} ({int((concept == c).sum())} pairs): {gl}[{gu}] ~ {el}[{eu}], r {buddies.r[j]:.2f}"})
    n = min(cfg.plot_images, len(sample))
    png = concepts_png(sample[:n], g[:n], e[:n], shown, stats)
    return result, pa.Table.from_pylist(rows_out, schema=PAIRS), png
