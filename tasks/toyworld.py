"""The procedural toy world: coloured shapes on textured backgrounds.

Every scene is a pure function of (split seed, index), so the world is
reproducible and its ground truth (boxes, masks, classes, captions) is exact.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mirage.params import Split, Toyworld

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

SHAPES = ("circle", "square", "triangle", "diamond", "cross")


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
    for name in cfg.classes:
        if name not in SHAPES:
            raise ValueError(f"toyworld.classes: unknown shape {name!r} (known: {', '.join(SHAPES)})")
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
    if kind == "cross":
        arm = r / 2.5
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    raise ValueError(f"unknown shape {kind!r}")


def background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A muted gradient or a smooth noise texture, float H x W x 3 in [0, 255]."""
    base = rng.uniform(40, 150, size=(2, 3))
    if rng.random() < 0.5:
        angle = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
        t = (np.cos(angle) * xx + np.sin(angle) * yy)
        t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
        return base[0] + (base[1] - base[0]) * t[..., None]
    coarse = rng.uniform(0, 1, size=(size // 4 + 1, size // 4 + 1, 1))
    noise = np.kron(coarse, np.ones((4, 4, 1)))[:size, :size]
    return base[0] + (base[1] - base[0]) * noise


def render_scene(cfg: Toyworld, split: Split, index: int) -> Scene:
    """Scene `index` of a split: 1..max_objects non-overlapping shapes."""
    rng = np.random.default_rng([split.seed, index])
    size = cfg.image_size
    image = background(rng, size)
    n = int(rng.integers(split.min_objects, split.max_objects + 1))
    objects: list[ToyObject] = []
    taken = np.zeros((size, size), dtype=bool)
    lo, hi = cfg.object_size
    for _ in range(n):
        for _attempt in range(50):
            s = int(rng.integers(lo, hi + 1))
            cx, cy = rng.uniform(s / 2 + 1, size - s / 2 - 1, size=2)
            kind = str(rng.choice(cfg.classes))
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
