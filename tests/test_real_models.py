"""Real architectures with random weights, saved and loaded back from a local
path, and the generate/features stages on them: item-level incrementality,
encoder switch and switch-back, determinism."""
from pathlib import Path

import numpy as np
import pytest
import torch

from flows.features import features_flow
from flows.generate import generate_flow
from mirage import random_models
from mirage.data import params
from mirage.data.store import read_table, table_metadata
from mirage.models.encoders import load_encoder
from mirage.models.fingerprint import encoder_spec
from mirage.models.generators import GenerationItem, load_generator
from tasks.generate import item_seed

pytestmark = pytest.mark.slow  # real architectures on the CPU

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
IMAGES = np.random.default_rng(0).integers(0, 255, (2, 40, 40, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("real")
    return {
        "vit-b-32": random_models.save_open_clip("ViT-B-32", root / "vit-b-32"),
        "vit-s-16": random_models.save_timm("vit_small_patch16_224", root / "vit-s-16"),
        "sd": random_models.save_text2image(root / "sd"),
        "dit": random_models.save_dit(root / "dit"),
    }


def test_open_clip_vit_b_32_loads_back_from_its_directory(saved):
    enc = load_encoder(encoder_spec(str(saved["vit-b-32"])), CPU)
    ref = load_encoder("random:ViT-B-32:0", CPU)  # the weights that were saved
    with torch.inference_mode():
        emb, keys = enc.encode_images(IMAGES)
        emb0, _ = ref.encode_images(IMAGES)
        _, tokens = enc.forward(enc.prepare(IMAGES), "tokens")
        text = enc.encode_text(["a red circle"])
    assert torch.allclose(emb, emb0, atol=1e-6)
    assert enc.image_size == 224 and enc.patch_grid == (7, 7) and emb.shape == (2, 512)
    assert keys.shape == (2, 49, 768) and tokens.shape == (2, 49, 768)
    assert not torch.allclose(keys, tokens)
    assert torch.allclose(text.norm(dim=-1), torch.ones(1))


def test_timm_vit_s_16_loads_back_from_its_directory(saved):
    spec = encoder_spec(str(saved["vit-s-16"]))
    assert spec.startswith("timm:local-dir:")
    enc = load_encoder(spec, CPU)
    ref = load_encoder("timm:random:vit_small_patch16_224:0", CPU)
    with torch.inference_mode():
        emb, keys = enc.encode_images(IMAGES)
        emb0, keys0 = ref.encode_images(IMAGES)
        _, tokens = enc.forward(enc.prepare(IMAGES), "tokens")
    assert torch.allclose(emb, emb0, atol=1e-6) and torch.allclose(keys, keys0, atol=1e-5)
    assert enc.patch_grid == (14, 14) and emb.shape == (2, 384)
    assert keys.shape == (2, 196, 384) and tokens.shape == (2, 196, 384)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)
    with pytest.raises(ValueError, match="no text tower"):
        enc.encode_text(["a circle"])


def test_text_to_image_pipeline_items_do_not_depend_on_their_batch(saved):
    gen = load_generator(str(saved["sd"]), "cpu")
    assert gen.kind == "text2image" and gen.native_size() is None
    items = [GenerationItem(f"k{i}", p, p, item_seed(0, p, i)) for i, p in enumerate(["a circle", "a square", "a cat"])]
    together = gen.sample(items, steps=2, guidance=0.0, size=32, pad_to=4)
    alone = gen.sample(items[2:], steps=2, guidance=0.0, size=32, pad_to=4)
    assert together.shape == (3, 32, 32, 3) and together.dtype == np.uint8
    assert np.array_equal(together[2], alone[0])
    assert not np.array_equal(together[0], together[1])


def test_token_merging_patches_a_text_to_image_unet_and_is_refused_for_dit(saved):
    items = [GenerationItem(f"k{i}", p, p, item_seed(0, p, i)) for i, p in enumerate(["a circle", "a square"])]
    plain = load_generator(str(saved["sd"]), "cpu").sample(items, steps=2, guidance=0.0, size=64, pad_to=2)
    gen = load_generator(str(saved["sd"]), "cpu", tome_ratio=0.5)
    info = gen.pipe.unet._tome_info
    assert info["args"]["ratio"] == 0.5 and info["args"]["max_downsample"] == 1  # tomesd's default: full-resolution blocks
    # the tiny UNet's attention starts at half resolution: with it in reach, merging changes the images
    assert np.array_equal(gen.sample(items, steps=2, guidance=0.0, size=64, pad_to=2), plain)
    info["args"]["max_downsample"] = 2
    merged = gen.sample(items, steps=2, guidance=0.0, size=64, pad_to=2)
    assert merged.shape == plain.shape and not np.array_equal(merged, plain)
    with pytest.raises(ValueError, match="generate.tome_ratio"):
        load_generator(str(saved["dit"]), "cpu", tome_ratio=0.5)


def test_dit_pipeline_takes_class_names(saved):
    gen = load_generator(str(saved["dit"]), "cpu")
    assert gen.kind == "dit" and gen.native_size() == 16
    gen.check_classes(("circle", "triangle"))
    with pytest.raises(ValueError, match=r"generate.classes: \['hexagon'\]"):
        gen.check_classes(("hexagon",))
    out = gen.sample([GenerationItem("k", "circle", "circle", 1)], steps=2, guidance=2.0, size=None, pad_to=2)
    assert out.shape == (1, 16, 16, 3)


def test_missing_generator_names_the_parameter(tmp_path):
    with pytest.raises(FileNotFoundError, match="generate.model"):
        load_generator(str(tmp_path), "cpu")


# -- the stages on real architectures ------------------------------------------

def files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in root.iterdir() if p.is_file()}


@pytest.fixture
def cfg(saved, monkeypatch, tmp_path):
    monkeypatch.setenv("MIRAGE_POOL", str(tmp_path / "pool"))
    base = params.load(ROOT / "params.yaml")
    gen = base.generate.model_copy(update={
        "model": str(saved["sd"]), "classes": ("circle", "square"), "prompt_templates": ("a {}", "a photo of a {}"),
        "per_prompt": 5, "steps": 2, "guidance": 0.0, "image_size": 32, "batch_size": 4, "shard_rows": 8})
    feats = base.features.model_copy(update={
        "encoder": "random:mirage-toy-clip:0", "batch_size": 4, "patches": True, "patch_backbone": "encoder:tokens",
        "workers": 2, "shard_rows": 8})
    return gen, feats


def test_generate_adds_only_new_items_and_matches_a_scratch_run(cfg, tmp_path):
    gen, _ = cfg
    first = generate_flow(gen, str(tmp_path / "a"))
    assert (first["images"], first["computed"], first["reused"]) == (20, 20, 0)
    more = generate_flow(gen.model_copy(update={"per_prompt": 6}), str(tmp_path / "a"))  # +10% items
    assert (more["images"], more["computed"], more["reused"]) == (24, 4, 20)
    generate_flow(gen.model_copy(update={"per_prompt": 6}), str(tmp_path / "b"))
    assert files(tmp_path / "a") == files(tmp_path / "b")  # identical bytes, shards and manifest
    table = read_table(tmp_path / "a").to_pylist()
    assert {r["prompt"] for r in table} == {"a circle", "a square", "a photo of a circle", "a photo of a square"}
    assert all(r["model"].startswith("sd@") and r["seed"] > 0 and r["width"] == 32 for r in table)


def test_features_switch_encoder_and_back_reuses_the_first(cfg, tmp_path):
    gen, feats = cfg
    images = str(tmp_path / "images")
    generate_flow(gen, images)
    out = tmp_path / "features"
    first = features_flow(feats, images, "unused", str(out))
    assert first["computed"] == 20
    kept = files(out)
    meta = table_metadata(out)
    assert meta["grid"] == "8,8,128" and meta["patches"] == "encoder:tokens"
    other = features_flow(feats.model_copy(update={"encoder": "random:mirage-toy-clip:1"}), images, "unused", str(out))
    assert other["computed"] == 20 and files(out) != kept
    back = features_flow(feats, images, "unused", str(out))
    assert {k: back[k] for k in ("items", "computed", "reused", "restored")} == {"items": 20, "computed": 0, "reused": 20, "restored": 20}
    assert files(out) == kept
    emb = np.stack(read_table(out, ["embedding"]).column("embedding").to_numpy(zero_copy_only=False))
    assert emb.dtype == np.float16 and np.allclose(np.linalg.norm(emb.astype(np.float32), axis=1), 1, atol=2e-3)


def test_features_are_deterministic_and_incremental(cfg, tmp_path):
    gen, feats = cfg
    images = str(tmp_path / "images")
    generate_flow(gen, images)
    feats = feats.model_copy(update={"workers": 0})
    features_flow(feats, images, "unused", str(tmp_path / "a"))
    generate_flow(gen.model_copy(update={"per_prompt": 6}), images)
    again = features_flow(feats.model_copy(update={"workers": 3}), images, "unused", str(tmp_path / "a"))
    assert again["computed"] == 4 and again["reused"] == 20
    features_flow(feats, images, "unused", str(tmp_path / "b"))
    # the new images sit among the old ones: the grown table keeps its full old shards and
    # records its order, so it holds the scratch table's rows in its order, not its file bytes
    assert read_table(tmp_path / "a").equals(read_table(tmp_path / "b"))


def test_search_ranks_like_brute_force_and_writes_a_sheet(cfg, tmp_path):
    from mirage.cli import main as cli_main
    from mirage.search import contact_sheet, search, top_k

    gen, feats = cfg
    images, out = str(tmp_path / "images"), str(tmp_path / "features")
    generate_flow(gen, images)
    features_flow(feats.model_copy(update={"patches": False}), images, "unused", out)
    encoder = load_encoder(feats.encoder, CPU)
    text = encoder.encode_text(["a circle"])[0].detach().numpy()
    table = read_table(out)
    emb = np.stack(table.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
    expected = np.argsort(-(emb @ text), kind="stable")[:5]
    got = top_k(out, text, 5, batch_rows=3)  # several batches: the running top k must merge right
    assert [i for i, _ in got] == [table.column("id")[int(j)].as_py() for j in expected]
    hits = search("a circle", out, images, encoder, k=5)
    assert [h.id for h in hits] == [i for i, _ in got] and all(h.path.endswith(".parquet") for h in hits)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    contact_sheet(hits, tmp_path / "sheet.png")
    from PIL import Image
    assert Image.open(tmp_path / "sheet.png").size == (5 * 128, 128 + 14)
    other = load_encoder("random:mirage-toy-clip:7", CPU)
    with pytest.raises(ValueError, match="were computed with random:mirage-toy-clip:0"):
        search("a circle", out, images, other)
    assert cli_main(["--root", str(tmp_path), "search", "a circle", "-k", "0"]) == 2
