"""Token Merging (ToMe, Bolya et al., ICLR 2023) for open_clip and timm ViTs.

After each block's attention, the `r` most similar pairs of patch tokens
(cosine of the attention keys averaged over heads, bipartite soft matching on
an alternating A/B split) are merged into their size-weighted average;
attention then adds log(size) to every key's logit (proportional attention),
so a merged token weighs as the tokens it stands for.  Unlike the official
timm patch, the prefix tokens (class token and registers) are never merged
nor merged into, and the blocks' LayerScale is kept.

Source tracking: `Merging.source` (B x P, long) says which remaining patch
token holds each of the P patches of the grid, so features of merged tokens
map back to the grid (`to_grid`: ToMe's sourceᵀ · x, as a gather: the dense
T' x P source matrix would cost 52 MB an image at 3600 patches).

At r = 0 nothing is patched: the model runs its own forward (byte-identical).
"""
from __future__ import annotations

import contextlib
import types
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


def schedule(r: int | tuple[int, float] | list[int], layers: int) -> list[int]:
    """Tokens merged in each of `layers` blocks: a constant r, ToMe's
    (r, inflection) (a linear ramp from r * (1 - inflection) to r * (1 + inflection)),
    or an explicit list (padded with zeros)."""
    if isinstance(r, list):
        return [int(v) for v in r[:layers]] + [0] * max(0, layers - len(r))
    r, inflect = (r if isinstance(r, tuple) else (r, 0.0))
    lo = int(r * (1.0 - inflect))
    hi = 2 * r - lo
    step = (hi - lo) / max(layers - 1, 1)
    return [int(lo + step * i) for i in range(layers)]


@dataclass
class Merging:
    """The state one merged forward carries from block to block."""

    rs: list[int]
    prefix: int  # tokens never merged: class token, registers
    trace: bool = False
    size: torch.Tensor | None = None  # B x T x 1: patches each token holds (prefix tokens: 1)
    source: torch.Tensor | None = None  # B x P: the patch token holding each patch, when traced
    layer: int = 0
    history: list[int] = field(default_factory=list)  # tokens after each block

    def attention_bias(self, x: torch.Tensor) -> torch.Tensor | None:
        """B x 1 x 1 x T: log(size) for proportional attention (None before any merge)."""
        return None if self.size is None else self.size.log()[:, None, None, :, 0].to(x.dtype)

    def merge(self, x: torch.Tensor, metric: torch.Tensor) -> torch.Tensor:
        """Merge this block's r pairs of patch tokens of x (B x T x C) by
        similarity of `metric` (B x T x D)."""
        r = self.rs[self.layer]
        self.layer += 1
        p = self.prefix
        if r > 0 and x.shape[1] - p >= 2:
            b, t, _ = x.shape
            if self.size is None:
                self.size = torch.ones(b, t, 1, dtype=x.dtype, device=x.device)
            if self.trace and self.source is None:
                self.source = torch.arange(t - p, device=x.device).expand(b, -1)
            fold, moved_to = bipartite_soft_matching(metric[:, p:], r)
            size = self.size[:, p:]
            merged = fold(x[:, p:] * size, "sum")
            new_size = fold(size, "sum")
            x = torch.cat([x[:, :p], merged / new_size], 1)
            self.size = torch.cat([self.size[:, :p], new_size], 1)
            if self.trace:
                self.source = moved_to.gather(1, self.source)
        self.history.append(x.shape[1])
        return x

    def to_grid(self, patches: torch.Tensor, source: torch.Tensor | None) -> torch.Tensor:
        """Features of the patch tokens (B x T' x C, prefix dropped) -> the grid's
        B x P x C: every patch takes the features of the token holding it
        (`source`: the state's source when the features were taken)."""
        if source is None:
            return patches
        return patches.gather(1, source[..., None].expand(-1, -1, patches.shape[-1]))


def bipartite_soft_matching(metric: torch.Tensor, r: int):
    """ToMe's matching on B x N x D: tokens alternate into A and B, each A token
    proposes its most similar B token, and the r best proposals merge.  Returns
    fold(x, mode): B x N x C -> B x (N - r) x C (the unmerged A tokens, then B),
    and moved_to: B x N, each token's position after the fold."""
    metric = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    a, b = metric[:, ::2], metric[:, 1::2]
    r = min(r, a.shape[1])
    scores = a @ b.transpose(-1, -2)
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True, stable=True)[..., None]
    unm_idx, src_idx = edge_idx[:, r:], edge_idx[:, :r]
    dst_idx = node_idx[..., None].gather(1, src_idx)

    def fold(x: torch.Tensor, mode: str) -> torch.Tensor:
        src, dst = x[:, ::2], x[:, 1::2]
        n, t1, c = src.shape
        unm = src.gather(1, unm_idx.expand(n, t1 - r, c))
        moved = src.gather(1, src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(1, dst_idx.expand(n, r, c), moved, reduce=mode)
        return torch.cat([unm, dst], 1)

    bsz, n = metric.shape[:2]
    t1 = a.shape[1]
    kept = t1 - r
    a_to = torch.empty(bsz, t1, dtype=torch.long, device=metric.device)
    a_to.scatter_(1, unm_idx[..., 0], torch.arange(kept, device=metric.device).expand(bsz, -1))
    a_to.scatter_(1, src_idx[..., 0], kept + dst_idx[..., 0])
    moved_to = torch.empty(bsz, n, dtype=torch.long, device=metric.device)
    moved_to[:, ::2] = a_to
    moved_to[:, 1::2] = kept + torch.arange(n - t1, device=metric.device)
    return fold, moved_to


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = t.shape
    return t.view(b, n, heads, c // heads).transpose(1, 2)


def _open_clip_block(self, q_x, k_x=None, v_x=None, attn_mask=None):
    """open_clip's ResidualAttentionBlock with merging (self-attention only)."""
    state: Merging = self._tome
    attn = self.attn
    x = self.ln_1(q_x)
    q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, -1)
    q, k, v = (_heads(t, attn.num_heads) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=state.attention_bias(q))
    out = attn.out_proj(out.transpose(1, 2).reshape(x.shape))
    x = q_x + self.ls_1(out)
    x = state.merge(x, k.mean(1))
    return x + self.ls_2(self.mlp(self.ln_2(x)))


def _timm_block(self, x, attn_mask=None, is_causal=False):
    """timm's vision_transformer.Block with merging."""
    state: Merging = self._tome
    attn = self.attn
    h = self.norm1(x)
    b, n, _ = h.shape
    gate = attn.gate(h).sigmoid() if getattr(attn, "gate", None) is not None else None
    q, k, v = attn.qkv(h).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=state.attention_bias(q))
    out = attn.norm(out.transpose(1, 2).reshape(b, n, -1))
    if gate is not None:
        out = out * gate
    out = attn.proj_drop(attn.proj(out))
    x = x + self.drop_path1(self.ls1(out))
    x = state.merge(x, k.mean(1))
    return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def blocks_of(model: torch.nn.Module) -> tuple[list[torch.nn.Module], object]:
    """The ViT's blocks and the block forward that merges, for an open_clip
    CLIP model or a timm VisionTransformer; ValueError naming features.tome_r otherwise."""
    from timm.layers import Attention

    visual = getattr(model, "visual", None)
    if visual is not None:
        from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

        if not isinstance(visual, VisionTransformer) or visual.attn_pool is not None or visual.pool_type != "tok":
            raise ValueError("features.tome_r: token merging needs an open_clip ViT pooled by its class token "
                             f"(this one: {type(visual).__name__}, pool {getattr(visual, 'pool_type', None)!r})")
        blocks = list(visual.transformer.resblocks)
        if not all(isinstance(b, ResidualAttentionBlock) for b in blocks):
            raise ValueError("features.tome_r: token merging supports open_clip's ResidualAttentionBlock only")
        return blocks, _open_clip_block
    from timm.models.vision_transformer import Block, VisionTransformer

    if not isinstance(model, VisionTransformer) or model.attn_pool is not None or model.global_pool != "token":
        raise ValueError("features.tome_r: token merging needs a timm VisionTransformer pooled by its class token "
                         f"(this one: {type(model).__name__}, pool {getattr(model, 'global_pool', None)!r})")
    blocks = list(model.blocks)
    if not all(type(b) is Block and type(b.attn) is Attention for b in blocks):
        raise ValueError("features.tome_r: token merging supports timm's vision_transformer.Block with its "
                         "standard Attention only (no rope, no parallel or post-norm blocks)")
    return blocks, _timm_block


def off(r) -> bool:
    """True when `r` merges nothing (0, (0, inflection), a list of zeros)."""
    if isinstance(r, (list, tuple)):
        return not any(r) if isinstance(r, list) else int(r[0]) == 0
    return int(r) == 0


@contextlib.contextmanager
def merging(model: torch.nn.Module, r, prefix: int, trace: bool = False):
    """Within the block, `model`'s ViT blocks merge tokens as `r` says
    (`schedule`); yields the Merging state (None at r = 0: nothing patched)."""
    if off(r):
        yield None
        return
    blocks, forward = blocks_of(model)
    rs = schedule(r, len(blocks))
    state = Merging(rs, prefix, trace)
    for block in blocks:
        block._tome = state
        block.forward = types.MethodType(forward, block)
    try:
        yield state
    finally:
        for block in blocks:
            del block.forward, block._tome
