"""EleutherAI sparsify: `<hookpoint>/cfg.json` + `<hookpoint>/sae.safetensors`.

Encoder (sparsify SparseCoder.encode + fused_encoder): pre = relu((x - b_dec) @ encoder.weightᵀ + encoder.bias),
b_dec not subtracted for transcoders; then top-k (or groupmax: max within k contiguous groups). `activation:
"abstopk"` (AbsTopK SAEs trained with sparsify's layout): no ReLU, the k pre-activations of largest magnitude, signs kept.
cfg fields and defaults follow sparsify's SparseCoderConfig; `d_in` sits beside them; no dtype field.
"""

from __future__ import annotations

from pathlib import Path

import torch

from autointerp.errors import ConfigError

from ._files import cfg_bool, cfg_int, check_shape, need_tensor, read_json, read_safetensors, to_float
from .base import LinearDictionary

CFG, WEIGHTS = "cfg.json", "sae.safetensors"


def is_sparsify_dir(p: Path) -> bool:
    return (p / WEIGHTS).is_file()


def load_sparsify(
    folder: Path, *, source: str, id: str, hookpoint: str | None, device: str | torch.device, dtype: torch.dtype
) -> LinearDictionary:
    cfg_path, w_path = folder / CFG, folder / WEIGHTS
    cfg = read_json(cfg_path)
    d_in = cfg_int(cfg, "d_in", cfg_path)
    k = cfg_int(cfg, "k", cfg_path, default=32)
    activation = cfg.get("activation", "topk")
    if activation not in ("topk", "groupmax", "abstopk"):
        raise ConfigError(f"{cfg_path}: field 'activation' must be 'topk', 'groupmax' or 'abstopk', got {activation!r}")
    transcode = cfg_bool(cfg, "transcode", cfg_path, False)
    if cfg.get("gram_lookup"):
        raise ConfigError(f"{cfg_path}: gram_lookup=true (n-gram mean subtraction) is not supported")
    n_cfg = cfg_int(cfg, "num_latents", cfg_path, default=0, minimum=0) or d_in * cfg_int(
        cfg, "expansion_factor", cfg_path, default=32
    )

    # the decoder stays as stored and mapped: extraction never reads it (LinearDictionary converts it on first use)
    t = read_safetensors(w_path, dtype, keep=("W_dec",))
    W, b = need_tensor(t, "encoder.weight", w_path), need_tensor(t, "encoder.bias", w_path)
    W_dec, b_dec = need_tensor(t, "W_dec", w_path), need_tensor(t, "b_dec", w_path)
    src = f"(n_latents={n_cfg}, d_in={d_in}) from {CFG}"
    check_shape(w_path, "encoder.weight", W, (n_cfg, d_in), src)
    check_shape(w_path, "encoder.bias", b, (n_cfg,), f"(n_latents={n_cfg},) from {CFG}")
    if W_dec.ndim != 2:
        raise ConfigError(f"{w_path}: W_dec has shape {tuple(W_dec.shape)}, expected 2 dims (n_latents, d_out)")
    # Only transcoders may write to a different width than they read.
    d_out = int(W_dec.shape[1]) if transcode else d_in
    check_shape(w_path, "W_dec", W_dec, (n_cfg, d_out), f"(n_latents={n_cfg}, d_out={d_out})")
    check_shape(w_path, "b_dec", b_dec, (d_out,), f"(d_out={d_out},) matching W_dec")
    skip = cfg_bool(cfg, "skip_connection", cfg_path, False)
    if skip != ("W_skip" in t):  # the cfg and the tensors must tell the same story, or the file is not this model
        raise ConfigError(f"{w_path}: {CFG} says skip_connection={str(skip).lower()} but the file "
                          f"{'lacks' if skip else 'holds'} W_skip")
    if skip:
        check_shape(w_path, "W_skip", t["W_skip"], (d_out, d_in), f"(d_out={d_out}, d_in={d_in})")
    if k > n_cfg:
        raise ConfigError(f"{cfg_path}: k={k} exceeds num_latents={n_cfg}")
    if activation == "groupmax" and n_cfg % k:
        raise ConfigError(f"{cfg_path}: groupmax needs num_latents ({n_cfg}) divisible by k ({k})")

    return LinearDictionary(
        format="sparsify", source=source, id=id, hookpoint=hookpoint, transcoder=transcode,
        W_enc=to_float(W, dtype, device), b_enc=to_float(b, dtype, device),
        W_dec=W_dec, b_dec=to_float(b_dec, dtype, device),
        activation={"topk": "relu_topk", "groupmax": "groupmax", "abstopk": "abstopk"}[activation], k=k,
        subtract_b_dec=not transcode, architecture=activation, cfg=cfg,
        W_skip=to_float(t["W_skip"], dtype, device) if skip else None,  # [d_out, d_in]: out += x @ W_skipᵀ
    )
