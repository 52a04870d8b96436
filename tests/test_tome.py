"""Token Merging (features.tome_r, mirage/models/tome.py) on open_clip and timm ViTs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mirage.data import params as params_mod
from mirage.data.images import mask_to_box
from mirage.models.encoders import load_encoder
from mirage.models.tome import Merging, bipartite_soft_matching, blocks_of, merging, schedule

ROOT = Path(__file__).resolve().parents[1]
TOY = f"local-dir:{ROOT / 'models' / 'encoder'}"


def timm_encoder(**kwargs):
    """A small timm ViT with random weights, built with `kwargs` (LayerScale, registers)."""
    import timm

    from mirage.models.encoders import TimmEncoder

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=0, **kwargs).eval()
    one = torch.ones(1, 3, 1, 1)
    return TimmEncoder(name="timm:test", model=model, image_size=64, mean=one * 0.5, std=one * 0.5,
                       device=torch.device("cpu"))


def open_clip_encoder(ls: float | None = None):
    import open_clip

    from mirage.models.encoders import Encoder

    torch.manual_seed(0)
    cfg = open_clip.get_model_config("mirage-toy-clip")
    cfg["vision_cfg"] = cfg["vision_cfg"] | ({"ls_init_value": ls} if ls else {})
    model = open_clip.CLIP(**cfg).eval()
    one = torch.ones(1, 3, 1, 1)
    return Encoder(name="test", model=model, image_size=32, mean=one * 0.5, std=one * 0.5, device=torch.device("cpu"))


def images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """Smooth random images (blocks of 8 px): neighbouring patches alike, as in real scenes."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, size // 8, size // 8, generator=g) * 2 - 1
    return low.repeat_interleave(8, 2).repeat_interleave(8, 3)


@pytest.mark.parametrize("make", [lambda: load_encoder(TOY, torch.device("cpu")), lambda: timm_encoder()],
                         ids=["open_clip", "timm"])
def test_at_r_zero_nothing_is_patched_and_the_outputs_are_the_models_own(make):
    enc = make()
    x = images(3, enc.image_size)
    blocks, _ = blocks_of(enc.model)
    with torch.inference_mode():
        plain = enc.forward(x, "keys")
        for off in (0, (0, 0.5), [0, 0]):
            with merging(enc.model, off, enc.num_prefix_tokens) as state:
                assert state is None and all("forward" not in vars(b) for b in blocks)
            emb, keys = enc.forward(x, "keys", off)
            assert torch.equal(emb, plain[0]) and torch.equal(keys, plain[1])
        own = enc.model.encode_image(x) if hasattr(enc.model, "encode_image") else enc._embed(x)
    assert torch.equal(plain[0], torch.nn.functional.normalize(own.float(), dim=-1))
    assert all("forward" not in vars(b) for b in blocks)  # left as found


@pytest.mark.parametrize("make", [lambda: open_clip_encoder(ls=0.1), lambda: timm_encoder(init_values=0.1)],
                         ids=["open_clip", "timm"])
def test_the_merging_blocks_compute_what_the_models_blocks_compute_layerscale_kept(make):
    """Merging only after the last block's attention: every earlier block runs
    mirage's forward without a merge, so the last block's keys must be the
    model's own (with LayerScale at 0.1, dropping it, as the official timm patch
    does, changes them far beyond the tolerance)."""
    enc = make()
    x = images(2, enc.image_size, seed=1)
    depth = len(blocks_of(enc.model)[0])
    with torch.inference_mode():
        _, own = enc.forward(x, "keys")
        emb, mine = enc.forward(x, "keys", [0] * (depth - 1) + [4])
        ls_free = [b.ls_1 if hasattr(b, "ls_1") else b.ls1 for b in blocks_of(enc.model)[0]]
        saved = [m.forward for m in ls_free]
        for m in ls_free:
            m.forward = lambda t: t
        try:
            _, dropped = enc.forward(x, "keys", [0] * (depth - 1) + [4])
        finally:
            for m, f in zip(ls_free, saved):
                m.forward = f
    assert torch.allclose(mine, own, atol=1e-4, rtol=1e-4)
    assert (dropped - own).abs().max() > 100 * (mine - own).abs().max()


def test_class_and_register_tokens_are_never_merged_nor_merged_into():
    enc = timm_encoder(reg_tokens=4, class_token=True)
    assert enc.num_prefix_tokens == 5
    captured = []
    handle = enc.model.norm.register_forward_hook(lambda _m, i, _o: captured.append(i[0]))
    x = images(2, 64, seed=2)
    with torch.inference_mode():
        with merging(enc.model, 3, 5, trace=True) as state:
            enc._embed(x)
    handle.remove()
    out = captured[-1]
    assert state.history[:2] == [5 + 13, 5 + 10] and state.history[-1] == 5 + 1  # 3 a block, down to one patch token
    assert out.shape[1] == state.history[-1] and torch.equal(state.size[:, :5], torch.ones(2, 5, 1))
    assert float(state.size[:, 5:].sum()) == 2 * 16  # every patch is held by exactly one token
    # the prefix rows pass through a merge untouched even when they are the most similar tokens
    m = Merging([4], prefix=2)
    t = torch.randn(1, 10, 6)
    metric = t.clone()
    metric[:, :2] = metric[:, 2:4]  # prefix tokens identical to two patch tokens
    merged = m.merge(t, metric)
    assert torch.equal(merged[:, :2], t[:, :2]) and merged.shape[1] == 6


def test_merged_tokens_are_size_weighted_averages_and_the_source_maps_every_patch_back():
    torch.manual_seed(3)
    b, n, c = 2, 12, 5
    metric = torch.randn(b, n, 8)
    metric[:, 2] = metric[:, 3] * 2  # 2 (A) and 3 (B) most alike: they merge first
    fold, moved_to = bipartite_soft_matching(metric, 1)
    x = torch.randn(b, n, c)
    out = fold(x, "mean")
    assert out.shape == (b, n - 1, c)
    assert torch.allclose(out[:, moved_to[0, 2]], (x[:, 2] + x[:, 3]) / 2)
    # moved_to agrees with ToMe's dense source (the identity folded with amax)
    dense = fold(torch.eye(n).expand(b, -1, -1), "amax")  # b x (n - 1) x n
    assert torch.equal(dense.argmax(1), moved_to)
    # a token of size 3 merged with one of size 1 weighs 3 : 1, and to_grid hands each patch its token
    m = Merging([1, 1], prefix=1, trace=True)
    tokens = torch.randn(1, 9, c)
    metric = torch.randn(1, 9, 4)
    after = m.merge(m.merge(tokens, metric), torch.randn(1, 8, 4))
    grid = m.to_grid(after[:, 1:], m.source)
    assert grid.shape == (1, 8, c)
    assert torch.equal(grid, after[:, 1:].gather(1, m.source[..., None].expand(-1, -1, c)))
    assert sorted(m.size[0, 1:, 0].tolist()) == sorted(torch.bincount(m.source[0], minlength=6).float().tolist())


def test_merged_features_keep_the_grid_and_do_not_depend_on_the_batch():
    enc = load_encoder(TOY, torch.device("cpu"))
    x = images(4, 32, seed=4)
    with torch.inference_mode():
        emb, keys = enc.forward(x, "keys", 4)
        emb1, keys1 = enc.forward(x[1:2], "keys", 4)
        _, plain = enc.forward(x, "keys")
    assert keys.shape == plain.shape == (4, 64, 128)
    assert torch.allclose(emb[1:2], emb1, atol=1e-5) and torch.allclose(keys[1:2], keys1, atol=1e-4)
    assert not torch.allclose(keys, plain, atol=1e-3)  # merged: patches share their token's keys
    # patches holding one token share its features: fewer distinct rows than patches
    assert len(torch.unique(keys[0], dim=0)) < 64


def test_the_schedule_and_the_parameter():
    assert schedule(8, 4) == [8, 8, 8, 8]
    assert schedule((8, 0.5), 3) == [4, 8, 12]
    assert schedule([1, 2], 4) == [1, 2, 0, 0]
    base = params_mod.load(ROOT / "params.yaml").features
    assert base.tome_r == 0 and base.merges_nothing
    before = base.model_dump(mode="json", exclude={"workers", "shard_rows", "tome_r"})
    import hashlib
    import json

    assert base.digest() == hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()[:16]
    assert base.model_copy(update={"tome_r": 4}).digest() != base.digest()
    for bad, says in ((-1, ">= 0"), ([8, 1.5], "inflection")):
        with pytest.raises(ValueError, match=says):
            params_mod.Features.model_validate(base.model_dump() | {"tome_r": bad})


def test_a_vit_that_merging_cannot_patch_is_refused_naming_the_parameter():
    enc = timm_encoder(global_pool="avg")
    with pytest.raises(ValueError, match="features.tome_r"):
        with merging(enc.model, 2, enc.num_prefix_tokens):
            pass
    with merging(enc.model, 0, enc.num_prefix_tokens) as state:  # off: nothing to patch, nothing refused
        assert state is None


def test_tokencut_on_merged_toy_keys_keeps_its_corloc():
    """TokenCut on the toy encoder's keys, 120 toy test scenes: with 4 tokens
    merged a block (mapped back to the grid) CorLoc stays within 0.06 of
    unmerged (measured on 300 scenes: 0.627 -> 0.623 test, 0.330 -> 0.297 ood,
    benchmarks/features_tome.py), and the cut on the merged graph
    (discover.on_merged) finds the same boxes but for a few (measured here:
    0.667, 0.658 and 0.650 on the merged graph)."""
    from mirage.models.patch_backbones import EncoderPatches
    from tasks.discover import cut_to_object, tokencut
    from tasks.evaluate import corloc
    from tasks.toyworld import render_scene

    p = params_mod.load(ROOT / "params.yaml")
    scenes = [render_scene(p.toyworld, p.toyworld.test, i) for i in range(120)]
    images = np.stack([s.image for s in scenes])
    gt = [[mask_to_box(o.mask) for o in s.objects] for s in scenes]
    enc = load_encoder(TOY, torch.device("cpu"))
    scores = {}
    for r, merged in ((0, False), (4, False), (4, True)):
        feats, grid = EncoderPatches(enc, "keys", r).patches(images)
        boxes = [cut_to_object(tokencut(f, grid, 0.2, 1e-5, merged=merged), 32, 32)[1] for f in feats]
        scores[r, merged] = corloc(boxes, gt, 0.5)
    assert scores[0, False] >= 0.5
    assert abs(scores[4, False] - scores[0, False]) <= 0.06
    assert abs(scores[4, True] - scores[4, False]) <= 0.03
