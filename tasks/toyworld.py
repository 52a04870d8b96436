"""The procedural toy world: coloured shapes on textured backgrounds.

Every scene is a pure function of (split seed, index), so the world is
reproducible and its ground truth (boxes, masks, classes, captions) is exact.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from mirage.data import schema
from mirage.data.images import encode_mask, encode_png, mask_to_box
from mirage.data.params import Split, Toyworld
from mirage.data.store import item_key

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "cyan": (40, 210, 220),
}

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring")


@dataclass(frozen=True)
class ToyObject:
    class_name: str
    color: str
    mask: np.ndarray  # bool H x W


@dataclass(frozen=True)
class Scene:
    image: np.ndarray  # uint8 H x W x 3
    objects: tuple[ToyObject, ...]
    caption: str


def check_names(cfg: Toyworld) -> None:
    """Fail early, naming the parameter, on a class or colour we cannot draw."""
    shapes = {"toyworld.classes": cfg.classes}
    for name in ("ood", "unlabeled"):
        split = getattr(cfg, name)
        if split is not None and split.shapes:
            shapes[f"toyworld.{name}.shapes"] = split.shapes
    for key, names in shapes.items():
        for name in names:
            if name not in SHAPES:
                raise ValueError(f"{key}: unknown shape {name!r} (known: {', '.join(SHAPES)})")
    for name in cfg.colors:
        if name not in COLORS:
            raise ValueError(f"toyworld.colors: unknown colour {name!r} (known: {', '.join(COLORS)})")


def shape_mask(kind: str, size: int, cx: float, cy: float, image_size: int) -> np.ndarray:
    """A filled shape of side/diameter `size` px centred at (cx, cy)."""
    yy, xx = np.mgrid[0:image_size, 0:image_size] + 0.5
    dx, dy, r = xx - cx, yy - cy, size / 2
    if kind == "circle":
        return dx**2 + dy**2 <= r**2
    if kind == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    if kind == "triangle":  # apex up: half-width grows from 0 at the top to r at the base
        t = (dy + r) / (2 * r)
        return (t >= 0) & (t <= 1) & (np.abs(dx) <= r * t)
    if kind == "diamond":
        return np.abs(dx) + np.abs(dy) <= r
    if kind == "ring":  # a hollow circle: the background shows through its middle
        return (dx**2 + dy**2 <= r**2) & (dx**2 + dy**2 >= (r * 0.55) ** 2)
    if kind == "cross":
        arm = r / 2.5
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    raise ValueError(f"unknown shape {kind!r}")


def background(rng: np.random.Generator, size: int, textures: tuple[str, ...] | None = None) -> np.ndarray:
    """A muted texture, float H x W x 3 in [0, 255]: by default a gradient or a
    smooth noise (the train and test splits); `textures` picks among those and
    the high-frequency ones no model was trained on: stripes, checker, dots."""
    base = rng.uniform(40, 150, size=(2, 3))
    if textures is None:
        kind = "gradient" if rng.random() < 0.5 else "noise"
    else:
        kind = str(rng.choice(textures))
    if kind == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        gy, gx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
        t = (np.cos(angle) * gx + np.sin(angle) * gy)
        t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
    elif kind == "noise":
        coarse = rng.uniform(0, 1, size=(size // 4 + 1, size // 4 + 1))
        t = np.kron(coarse, np.ones((4, 4)))[:size, :size]
    else:
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
        period = rng.uniform(3, 7)
        if kind == "stripes":
            angle = rng.uniform(0, np.pi)
            t = np.sin(2 * np.pi * (np.cos(angle) * xx + np.sin(angle) * yy) / period) > 0
        elif kind == "checker":
            t = (np.floor(xx / period) + np.floor(yy / period)) % 2 == 1
        else:  # dots
            t = ((xx % period) - period / 2) ** 2 + ((yy % period) - period / 2) ** 2 <= (period / 3.5) ** 2
    return base[0] + (base[1] - base[0]) * np.asarray(t, dtype=np.float64)[..., None]


def render_scene(cfg: Toyworld, split: Split, index: int) -> Scene:
    """Scene `index` of a split: min_objects..max_objects non-overlapping
    shapes (of the split's own shapes and textures where it has them)."""
    rng = np.random.default_rng([split.seed, index])
    size = cfg.image_size
    image = background(rng, size, split.textures)
    shapes = split.shapes or cfg.classes
    n = int(rng.integers(split.min_objects, split.max_objects + 1))
    objects: list[ToyObject] = []
    taken = np.zeros((size, size), dtype=bool)
    lo, hi = cfg.object_size
    for _ in range(n):
        for _attempt in range(50):
            s = int(rng.integers(lo, hi + 1))
            cx, cy = rng.uniform(s / 2 + 1, size - s / 2 - 1, size=2)
            kind = str(rng.choice(shapes))
            mask = shape_mask(kind, s, cx, cy, size)
            # keep a one-pixel gap so objects never touch: boxes stay unambiguous
            grown = mask | np.roll(mask, 1, 0) | np.roll(mask, -1, 0) | np.roll(mask, 1, 1) | np.roll(mask, -1, 1)
            if mask.sum() >= 4 and not (grown & taken).any():
                break
        else:
            continue  # no room left for another object
        color = str(rng.choice(cfg.colors))
        shade = np.array(COLORS[color]) * rng.uniform(0.85, 1.0)
        image[mask] = shade
        taken |= mask
        objects.append(ToyObject(kind, color, mask))
    image = np.clip(image + rng.normal(0, 4, size=image.shape), 0, 255).astype(np.uint8)
    caption = " and ".join(f"a {o.color} {o.class_name}" for o in objects)
    return Scene(image=image, objects=tuple(objects), caption=caption)


VERSION = 1  # bump when rendering changes: it is part of every scene's key


def scene_key(cfg: Toyworld, split: Split, index: int) -> str:
    # `n` is left out on purpose: growing a split keeps the scenes it had.
    other = {k: v for k, v in split.spec().items() if k in ("shapes", "textures")}  # only where set: old keys hold
    return item_key("toyworld", VERSION, cfg.image_size, cfg.classes, cfg.colors, cfg.object_size,
                    split.seed, split.min_objects, split.max_objects, index, *([other] if other else []))


def render_batch(cfg: Toyworld, split: Split, specs: list[tuple[str, int]]) -> pa.Table:
    rows = []
    for key, index in specs:
        scene = render_scene(cfg, split, index)
        objects = [
            {"class_name": o.class_name, "color": o.color, "box": mask_to_box(o.mask), "mask": encode_mask(o.mask)}
            for o in scene.objects
        ]
        rows.append({
            "key": key, "id": f"s{split.seed}-{index:06d}", "image": encode_png(scene.image),
            "width": cfg.image_size, "height": cfg.image_size, "caption": scene.caption,
            "seed": index, "objects": objects,
        })
    return pa.Table.from_pylist(rows, schema=schema.SCENES)


def unlabeled_images(cfg: Toyworld, split: Split) -> dict[str, bytes]:
    """The unlabeled split as files: name -> PNG bytes, one scene each (its
    objects, boxes and masks are not written: nothing downstream may see them)."""
    return {f"s{split.seed}-{index:06d}.png": encode_png(render_scene(cfg, split, index).image)
            for index in range(split.n)}
