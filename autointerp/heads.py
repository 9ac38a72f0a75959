"""Which attention heads a latent lives in. A dictionary at `attn_z.N` reads the heads' concatenated outputs
(n_heads blocks of d_head), so each decoder row splits into per-head blocks; a latent's share of head h is the
fraction of its decoder row's squared norm in block h (shares sum to 1)."""

from __future__ import annotations

import numpy as np
import torch


def head_shares(decoder: torch.Tensor, n_heads: int, chunk: int = 1 << 16) -> np.ndarray:
    """decoder [n, n_heads × d_head] -> shares [n, n_heads] float32, a chunk of rows at a time (a 1M-latent
    decoder is never squared whole)."""
    n, width = decoder.shape
    if width % n_heads:
        raise ValueError(f"decoder width {width} is not a multiple of {n_heads} heads")
    out = np.empty((n, n_heads), np.float32)
    for lo in range(0, n, chunk):
        sq = decoder[lo:lo + chunk].float().reshape(-1, n_heads, width // n_heads).square().sum(-1)
        out[lo:lo + chunk] = (sq / sq.sum(-1, keepdim=True).clamp(min=1e-30)).cpu().numpy()
    return out


def n_heads_of(model) -> int | None:
    """The subject model's attention heads per layer (None when its config does not say)."""
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
    n = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None)
    return int(n) if n else None
