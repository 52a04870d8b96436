"""Every table's schema.  All writers and readers go through here.

Conventions: boxes are (x, y, w, h) in pixels of the stored image; masks are
COCO RLE `counts` strings (pycocotools, Fortran order) of the image's size;
embeddings are L2-normalised float16.  Every table starts with `key`, the
item key that the shard store uses for item-level incrementality.
"""
from __future__ import annotations

import pyarrow as pa

BOX = pa.list_(pa.float32(), 4)

OBJECT_TRUTH = pa.struct(
    [
        ("class_name", pa.string()),
        ("color", pa.string()),
        ("box", BOX),
        ("mask", pa.string()),
    ]
)

SCENES = pa.schema(
    [
        ("key", pa.string()),
        ("id", pa.string()),
        ("image", pa.binary()),  # PNG bytes
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("caption", pa.string()),
        ("seed", pa.int64()),
        ("objects", pa.list_(OBJECT_TRUTH)),
    ]
)

IMAGES = pa.schema(
    [
        ("key", pa.string()),
        ("id", pa.string()),
        ("image", pa.binary()),  # PNG bytes
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("prompt", pa.string()),
        ("class_name", pa.string()),
        ("seed", pa.int64()),
        ("model", pa.string()),
        ("steps", pa.int32()),
        ("guidance", pa.float32()),
    ]
)

# Your own images (stage import): the generated images' columns, then where each came from.
IMPORTED = pa.schema(
    list(IMAGES)
    + [
        ("provenance", pa.string()),       # "imported"
        ("source", pa.string()),           # the original file, relative to the project root when inside it
        ("original_width", pa.int32()),    # before resizing to sources.max_size (after EXIF orientation)
        ("original_height", pa.int32()),
    ]
)


def features(dim: int, patch_len: int | None) -> pa.Schema:
    """Features of one encoder: `embedding` has `dim` values; `patches`, when
    cached, holds grid_h * grid_w * channels values (grid in the metadata)."""
    fields = [
        ("key", pa.string()),
        ("id", pa.string()),
        ("model", pa.string()),
        ("embedding", pa.list_(pa.float16(), dim)),
    ]
    if patch_len:
        fields.append(("patches", pa.list_(pa.float16(), patch_len)))
    return pa.schema(fields)


DISCOVERED = pa.struct(
    [
        ("box", BOX),
        ("mask", pa.string()),
        ("score", pa.float32()),        # 1 - the cut's eigenvalue: higher is a cleaner cut
        ("label", pa.string()),         # CLIP zero-shot class of the box's crop
        ("label_score", pa.float32()),  # its softmax probability
    ]
)

# One row per image (an image where nothing was found keeps its row, with no objects).
OBJECTS = pa.schema(
    [
        ("key", pa.string()),
        ("image_id", pa.string()),
        ("prompt_class", pa.string()),  # the generating prompt's class, if known
        ("objects", pa.list_(DISCOVERED)),  # best cut first
    ]
)


# Stage discover_splits: discovery's boxes on the evaluation splits, per
# (split, weights, method), one row an image (in the split's order)
SPLIT_BOXES = pa.schema(
    [
        ("split", pa.string()),      # test | ood
        ("weights", pa.string()),    # learned | random (the baseline: the same backbone with random weights)
        ("method", pa.string()),     # tokencut | maskcut
        ("image", pa.int32()),       # the image's index in its split
        ("boxes", pa.list_(pa.list_(pa.float64(), 4))),  # best cut first
        ("scores", pa.list_(pa.float64())),              # 1 - the cut's eigenvalue
    ]
)
