"""Item keys hold everything that changes an item's bytes and nothing else.

For each parameter, change it from a finished run and rerun the item stages:
exactly the items it should recompute are recomputed (all, none or the
affected ones), counted by the stores themselves.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from flows.discover import discover_flow
from flows.features import features_flow
from flows.generate import generate_flow
from flows.toyworld import toyworld_flow
from mirage.data import params as params_mod

pytestmark = pytest.mark.slow  # every item stage per case

ROOT = Path(__file__).resolve().parents[1]
GENERATOR = str(ROOT / "models" / "generator")
ENCODER = str(ROOT / "models" / "encoder")
TRAIN, TEST, IMAGES = 16, 6, 6  # tiny: scenes per split, generated images (3 classes x 2)
ALL = {"train": TRAIN, "test": TEST, "generate": IMAGES, "features": IMAGES, "discover": IMAGES}
NONE = dict.fromkeys(ALL, 0)
GPU = torch.cuda.is_available()  # `auto` devices resolve to it

# parameter, new value, items recomputed per stage (what is not named: 0)
CASES = [
    ("toyworld.test.n", TEST + 2, {"test": 2}),  # the train split and its models are left alone
    ("toyworld.test.seed", 7, {"test": TEST}),
    ("toyworld.shard_rows", 5, {}),  # layout only
    ("toyworld.colors", ["red", "blue"], {"train": TRAIN, "test": TEST}),
    ("generate.per_prompt", 3, {"generate": 3, "features": 3, "discover": 3}),  # one more per class
    ("generate.steps", 3, {"generate": IMAGES, "features": IMAGES, "discover": IMAGES}),
    ("generate.shard_rows", 4, {}),
    # resolved values key items: `cpu` is what `auto` resolves to without a GPU (with one, a change)
    ("generate.device", "cpu", {"generate": IMAGES, "features": IMAGES, "discover": IMAGES} if GPU else {}),
    ("features.batch_size", 3, {"features": IMAGES, "discover": IMAGES}),  # batch shape changes float bytes
    ("features.workers", 2, {}),  # runtime only
    ("features.shard_rows", 4, {}),
    # `auto` computes float32 on the CPU (autocast float16 on a GPU: then a change)
    ("features.dtype", "float32", {"features": IMAGES, "discover": IMAGES} if GPU else {}),
    ("features.patch_backbone", "encoder:keys", {"features": IMAGES, "discover": IMAGES}),
    ("features.tome_r", 2, {"features": IMAGES, "discover": IMAGES}),  # merged tokens: other embeddings
    ("features.tome_r", [0, 0.5], {}),  # a ramp from 0 to 0 merges nothing: the keys it always had
    ("discover.tau", 0.5, {"discover": IMAGES}),
    ("discover.on_merged", True, {"discover": IMAGES}),
    ("discover.solver", "torch", {"discover": IMAGES}),  # another solver: float bytes may differ
    ("discover.prompt_template", "a photo of a {}", {"discover": IMAGES}),
    ("discover.shard_rows", 3, {}),
]


def run_all(p: params_mod.Params, out: Path) -> dict[str, int]:
    """Every item stage once, in order; items computed per stage."""
    world = toyworld_flow(p.toyworld, str(out / "toyworld"))
    gen = generate_flow(p.generate, str(out / "generated"))
    feats = features_flow(p.features, str(out / "generated"), p.generate.model, str(out / "features"))
    found = discover_flow(p.discover, p.features, str(out / "generated"), str(out / "features"),
                          str(out / "discovery"), str(out / "discovery.coco.json"))
    return {"train": world["train"]["computed"], "test": world["test"]["computed"], "generate": gen["computed"],
            "features": feats["computed"], "discover": found["computed"]}


def tiny(overrides: dict) -> params_mod.Params:
    layout = {k: v for k, v in overrides.items() if k.endswith(".shard_rows")}  # defaults, not in params.yaml
    overrides = {k: v for k, v in overrides.items() if k not in layout}
    p = _load(overrides)
    for key, value in layout.items():
        section = key.split(".")[0]
        p = p.model_copy(update={section: getattr(p, section).model_copy(update={"shard_rows": value})})
    return p


def _load(overrides: dict) -> params_mod.Params:
    return params_mod.load(ROOT / "params.yaml", {
        "toyworld.train": {"n": TRAIN, "seed": 1, "min_objects": 1, "max_objects": 1},
        "toyworld.test": {"n": TEST, "seed": 2, "min_objects": 1, "max_objects": 3},
        "generate.model": GENERATOR, "generate.per_prompt": 2, "generate.steps": 2, "generate.batch_size": 4,
        "features.encoder": ENCODER, "features.batch_size": 4, **overrides})


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("keys") / "base"
    assert run_all(tiny({}), out) == ALL
    return out


@pytest.mark.parametrize("key, value, expected", CASES, ids=[c[0] for c in CASES])
def test_a_parameter_recomputes_exactly_the_items_it_changes(base, tmp_path, monkeypatch, key, value, expected):
    monkeypatch.setenv("MIRAGE_POOL", str(tmp_path / "pool"))  # nothing restored from an earlier case
    out = tmp_path / "run"
    shutil.copytree(base, out)
    leaf = key.rpartition(".")[2]
    if key.startswith("toyworld.test."):  # a field of the split's mapping
        overrides = {"toyworld.test": {**tiny({}).toyworld.test.model_dump(), leaf: value}}
    else:
        overrides = {key: value}
    assert run_all(tiny(overrides), out) == {**NONE, **expected}


@pytest.mark.parametrize("spec, repo", [
    ("stabilityai/sd-turbo", "stabilityai/sd-turbo"),  # a diffusers pipeline
    ("ViT-B-16:laion2b_s34b_b88k", "laion/CLIP-ViT-B-16-laion2B-s34B-b88K"),  # an open_clip tag's source
    ("timm:vit_small_patch16_224.dino", "timm/vit_small_patch16_224.dino"),
])
def test_a_hub_model_is_keyed_by_the_revision_it_was_loaded_from(tmp_path, monkeypatch, spec, repo):
    from mirage.models.fingerprint import model_fingerprint

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    assert model_fingerprint(spec) == spec  # not downloaded: the name alone
    ref = tmp_path / f"models--{repo.replace('/', '--')}" / "refs" / "main"
    ref.parent.mkdir(parents=True)
    ref.write_text("1111aaaa\n")
    assert model_fingerprint(spec) == f"{spec}@1111aaaa"
    ref.write_text("2222bbbb\n")  # the hub model was updated and downloaded again: other items
    assert model_fingerprint(spec) == f"{spec}@2222bbbb"
    assert model_fingerprint("random:ViT-B-32:0") == "random:ViT-B-32:0"
