"""Real architectures with random weights, saved the way their libraries save
pretrained ones.  No machine here can download weights, so tests and
benchmarks exercise the real loading code on these: an open_clip model, a
timm ViT, a Stable-Diffusion-layout text-to-image pipeline and a DiT pipeline.

    python -m mirage.random_models tiny-sd OUT   (or: dit OUT, open_clip ARCH OUT, timm NAME OUT)

`save_text2image` takes the UNet/VAE widths and the text model's size, so an
SD-scale pipeline for a GPU benchmark is one call away.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch


def save_open_clip(arch: str, out: Path, seed: int = 0) -> Path:
    """open_clip's local-dir layout: load with `local-dir:OUT` (or just OUT)."""
    from mirage.models.encoders import load_encoder, save_encoder

    enc = load_encoder(f"random:{arch}:{seed}", torch.device("cpu"))
    save_encoder(enc.model, arch, out)
    return out


def save_timm(name: str, out: Path, seed: int = 0) -> Path:
    """timm's save_for_hf layout (config.json + model.safetensors): `timm:local-dir:OUT`."""
    import timm
    from timm.models import save_for_hf

    torch.manual_seed(seed)
    save_for_hf(timm.create_model(name, pretrained=False), str(out), safe_serialization=True)
    return out


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's byte-to-character table (CLIP's BPE works on these characters)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return dict(zip(bs, map(chr, cs)))


def _byte_tokenizer(tmp: Path):
    """A CLIP tokenizer whose vocabulary is single bytes (no merges): any text
    encodes.  Its files are read at construction; save_pretrained copies them."""
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab |= {c + "</w>": len(chars) + i for i, c in enumerate(chars)}
    vocab |= {"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1}
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "vocab.json").write_text(json.dumps(vocab))
    (tmp / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(tmp / "vocab.json"), str(tmp / "merges.txt"), model_max_length=77), vocab


def _vae(channels: tuple[int, ...]):
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=channels, in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * len(channels),
                         up_block_types=("UpDecoderBlock2D",) * len(channels), norm_num_groups=min(32, channels[0]))


def save_text2image(out: Path, seed: int = 0, unet_channels: tuple[int, ...] = (32, 64), vae_channels=(32, 64),
                    text_width: int = 32, text_layers: int = 2, sample_size: int = 32) -> Path:
    """A StableDiffusionPipeline (SD 1.5 / SD-Turbo layout: UNet2DConditionModel,
    AutoencoderKL, CLIP text model, Euler scheduler with trailing spacing),
    loadable with AutoPipelineForText2Image.  Defaults are tiny."""
    from diffusers import (
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer, vocab = _byte_tokenizer(Path(tmp))
    text = CLIPTextModel(CLIPTextConfig(
        hidden_size=text_width, intermediate_size=4 * text_width, num_attention_heads=max(1, text_width // 64) or 1,
        num_hidden_layers=text_layers, vocab_size=len(vocab), bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"]))
    n = len(unet_channels)
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, block_out_channels=unet_channels, layers_per_block=1,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        cross_attention_dim=text_width, attention_head_dim=8, norm_num_groups=min(32, unet_channels[0]))
    pipe = StableDiffusionPipeline(
        unet=unet, vae=_vae(tuple(vae_channels)), text_encoder=text, tokenizer=tokenizer,
        scheduler=EulerDiscreteScheduler(timestep_spacing="trailing", steps_offset=1), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def save_dit(out: Path, seed: int = 0, labels: tuple[str, ...] = ("circle", "square", "triangle")) -> Path:
    """A tiny class-conditional DiTPipeline (Transformer2DModel + AutoencoderKL + DDIM)."""
    from diffusers import DDIMScheduler, DiTPipeline, Transformer2DModel

    torch.manual_seed(seed)
    transformer = Transformer2DModel(
        sample_size=8, num_layers=2, attention_head_dim=8, num_attention_heads=2, in_channels=4, out_channels=8,
        patch_size=2, norm_type="ada_norm_zero", num_embeds_ada_norm=1000)  # DiTPipeline's null class is id 1000
    DiTPipeline(transformer=transformer, vae=_vae((32, 64)), scheduler=DDIMScheduler()).save_pretrained(
        out, safe_serialization=True)
    # like facebook/DiT-XL-2-256: class names live in model_index.json, which
    # from_pretrained hands to DiTPipeline(id2label=...)
    index = json.loads((out / "model_index.json").read_text())
    index["id2label"] = {str(i): name for i, name in enumerate(labels)}
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return out


def main(argv: list[str]) -> None:
    kinds = {"tiny-sd": save_text2image, "dit": save_dit}
    if len(argv) == 2 and argv[0] in kinds:
        print(kinds[argv[0]](Path(argv[1])))
    elif len(argv) == 3 and argv[0] in ("open_clip", "timm"):
        print((save_open_clip if argv[0] == "open_clip" else save_timm)(argv[1], Path(argv[2])))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
