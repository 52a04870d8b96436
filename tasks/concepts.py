"""Rosetta Neurons: units of the generator and of the encoder that fire together.

Dravid et al. (ICCV 2023): run the generated images through both models, keep
every unit's activation map, correlate every generator unit with every
encoder unit over images x positions (Pearson), and pair the units that are
each other's best match ("best buddies").  mirage adds what makes it a
measurement: the same with random-weight twins and with shuffled image
pairing, split-half stability, and mask IoU / AUROC of each pair's maps
against the toy world's ground-truth objects.

Activation maps: mirage/models/unit_maps.py (the generator's UNet on the noised
image, each ViT block's MLP activation, all on `concepts.grid`).  Statistics:
tasks/concept_stats.py.  Per chunk of images (one store item) float64
moments (the cross-moment matrix kept as float32 in the row); chunks combine
exactly, so a run with more images computes only the new images' chunks.  Memory is O(units_A x units_B), never
O(images).  Each chunk holds four sets per encoder: the two halves of its
images (by item key; the union is the full set, the halves give stability),
shuffled pairing (generator on image i, encoder on the image before it in
key-hash order) and the random-weight twins.
"""
from __future__ import annotations

import hashlib
import json
import io
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from mirage.data.images import decode_png
from mirage.data.params import Concepts
from mirage.data.store import interruption_point
from mirage.models.devices import MODEL_BUILD, resolve_device
from mirage.models.encoders import load_encoder, random_twin
from mirage.models.fingerprint import encoder_spec, model_fingerprint
from tasks.concept_stats import Accumulator, Buddies, MaskScores, Moments, best_buddies, jaccard, moments_bytes
from mirage.models.unit_maps import EncoderUnits, GeneratorUnits

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
    ("generator_mean", pa.float32()),   # each side's unit over the same rows: its mean and std (z-scores for
    ("generator_std", pa.float32()),    # features.patch_backbone: concepts)
    ("encoder_mean", pa.float32()),
    ("encoder_std", pa.float32()),
    ("concept", pa.int32()),            # cluster of the pair's mean maps (trained pairs; -1 otherwise)
    ("test_iou", pa.float32()),         # mean mask IoU on the test split (the pair's map, top q of positions)
    ("test_auroc", pa.float32()),
    ("ood_iou", pa.float32()),
    ("ood_auroc", pa.float32()),
])


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


# ---------------------------------------------------------------- ground truth

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


def z_maps(maps: torch.Tensor, columns: np.ndarray, mean: np.ndarray, std: np.ndarray) -> torch.Tensor:
    """B x U x g x g -> the `columns`' maps z-scored by the generated images' statistics, B x len(columns) x g x g."""
    shape = (1, len(columns), 1, 1)
    return (maps[:, columns] - torch.from_numpy(mean[columns]).float().view(shape)) / \
        torch.from_numpy(std[columns]).float().clamp_min(1e-6).view(shape)


def pair_maps(g: torch.Tensor, e: torch.Tensor, buddies: Buddies, stats: Moments, size: tuple[int, int]) -> torch.Tensor:
    """The mean of a pair's two z-scored maps, upsampled to the image: B x P x H x W."""
    za = z_maps(g, buddies.a, stats.mean_a, stats.std_a())
    zb = z_maps(e, buddies.b, stats.mean_b, stats.std_b())
    return F.interpolate((za + zb) / 2, size=size, mode="bilinear", align_corners=False)


def ground_truth(gen: GeneratorUnits, enc: EncoderUnits, pair_sets: list[tuple[Buddies, Moments]], scenes: list[dict],
                 top_q: float, batch_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each pair's mean mask IoU and AUROC over the scenes (their object masks),
    for every (pairs, their statistics) of these two models: one pass of the
    models over the scenes serves them all."""
    scores = [MaskScores(len(buddies.a)) for buddies, _ in pair_sets]
    todo = [i for i, (buddies, _) in enumerate(pair_sets) if len(buddies.a)]
    for start in range(0, len(scenes) if todo else 0, batch_size):
        part = scenes[start : start + batch_size]
        pixels = np.stack([decode_png(s["image"]) for s in part])
        fg = foreground_masks(part)
        g, e = gen.maps(pixels).cpu(), enc.maps(pixels).cpu()
        for i in todo:
            scores[i].add(pair_maps(g, e, *pair_sets[i], fg.shape[1:]), fg, top_q)
    return [(s.iou(), s.auroc()) for s in scores]


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
        za, zb = (F.interpolate(z_maps(maps, np.array([col]), mean, std), size=(h, w), mode="bilinear",
                                align_corners=False)[:, 0].numpy()
                  for maps, col, mean, std in ((gen_maps, c["a"], stats.mean_a, stats.std_a()),
                                               (enc_maps, c["b"], stats.mean_b, stats.std_b())))
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
        found = {condition: best_buddies(sets[condition].correlation(), cfg.top_k, cfg.min_corr) for condition in CONDITIONS}
        # shuffled pairs are found on mismatched images but scored with the trained models' own maps: one pass
        # of the trained models over each split scores the trained and the shuffled pairs, one of the twins the random
        scored: dict[str, dict] = {condition: {} for condition in CONDITIONS}
        for gen, enc, conditions in ((models.generator, units, ("trained", "shuffled")),
                                     (models.random_generator, models.random_encoders[name], ("random",))):
            for split, scenes in splits.items():
                results = ground_truth(gen, enc, [(found[c], sets[c]) for c in conditions], scenes, cfg.top_q,
                                       cfg.batch_size)
                for condition, result in zip(conditions, results):
                    scored[condition][split] = result
        for condition in CONDITIONS:
            buddies, stats, scores = found[condition], sets[condition], scored[condition]
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
                a, b = int(buddies.a[j]), int(buddies.b[j])
                row = {"model": name, "condition": condition, "generator_layer": gl, "generator_unit": gu,
                       "encoder_layer": el, "encoder_unit": eu, "corr": float(buddies.r[j]), "concept": int(concept[j]),
                       "generator_mean": float(stats.mean_a[a]), "generator_std": float(np.sqrt(stats.m2_a[a] / stats.n)),
                       "encoder_mean": float(stats.mean_b[b]), "encoder_std": float(np.sqrt(stats.m2_b[b] / stats.n))}
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
    # how the maps were made: what features.patch_backbone `concepts` needs to remake them
    recipe = {"encoder": first, "grid": cfg.grid, "timestep": cfg.timestep, "noise_seed": cfg.noise_seed,
              "random_seed": cfg.random_seed}
    return result, pa.Table.from_pylist(rows_out, schema=PAIRS.with_metadata({"mirage": json.dumps(recipe)})), png
