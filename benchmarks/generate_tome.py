"""Does tomesd (generate.tome_ratio) pay?  An SD 1.5 UNet forward with and without it.

The SD 1.5 UNet architecture (UNet2DConditionModel's defaults, cross-attention
768, random weights) at 512 px (64 x 64 latents), batch 1, CPU float32, one
denoising forward per timing, ratios interleaved in each repeat (side by
side), with PyTorch's fused attention (diffusers' default) and with the
classic attention processor (what tomesd's 1.87x at ratio 0.5 was measured
against).  Also printed: the output's relative change against ratio 0.

    .venv/bin/python benchmarks/generate_tome.py --repeats 2
"""
from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ratios", default="0,0.3,0.5")
    p.add_argument("--latent", type=int, default=64, help="latent side (64: 512 px)")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    import tomesd
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    torch.manual_seed(0)
    unet = UNet2DConditionModel(cross_attention_dim=768).eval()
    x = torch.randn(1, 4, args.latent, args.latent)
    text = torch.randn(1, 77, 768)
    t = torch.tensor([500])
    ratios = [float(r) for r in args.ratios.split(",")]
    print(f"SD 1.5 UNet (random weights, {sum(q.numel() for q in unet.parameters()) / 1e6:.0f} M parameters), "
          f"latents {args.latent}x{args.latent} ({args.latent * 8} px), batch 1, CPU, best of {args.repeats}")
    print(f"{'attention':<12}{'ratio':>7}{'s/forward':>11}{'x ratio 0':>11}{'rel. change':>13}")
    for name, processor in (("fused", AttnProcessor2_0()), ("classic", AttnProcessor())):
        unet.set_attn_processor(processor)
        seconds = {r: [] for r in ratios}
        outs = {}
        with torch.inference_mode():
            for _ in range(args.repeats):
                for r in ratios:
                    if r:
                        tomesd.apply_patch(unet, ratio=r)
                    start = time.perf_counter()
                    outs[r] = unet(x, t, encoder_hidden_states=text).sample
                    seconds[r].append(time.perf_counter() - start)
                    tomesd.remove_patch(unet)
        base = min(seconds[ratios[0]])
        for r in ratios:
            change = float((outs[r] - outs[ratios[0]]).norm() / outs[ratios[0]].norm())
            print(f"{name:<12}{r:>7.2f}{min(seconds[r]):>11.2f}{base / min(seconds[r]):>11.2f}{change:>13.4f}")


if __name__ == "__main__":
    main()
