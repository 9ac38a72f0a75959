"""SAELens: `cfg.json` + `sae_weights.safetensors` (+ optional `sparsity.safetensors`).

Encoder (SAELens 6.x SAE.process_sae_in + <Arch>SAE.encode):
  x -> runtime normalisation -> minus b_dec if apply_b_dec_to_input -> pre = x @ W_enc + b_enc -> activation.
Transcoders never subtract b_dec (it lives in the output space). Pre-6.0 configs are flat (`hook_point`/`hook_name`,
`activation_fn_str`, `activation_fn_kwargs: {k}`), and the oldest lack `architecture`/`apply_b_dec_to_input`
(defaults: standard, relu, true), as in SAELens' own backwards-compatibility defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from autointerp.errors import ConfigError

from ._files import cfg_bool, cfg_int, check_shape, need_tensor, read_json, read_safetensors, to_float
from .base import LinearDictionary

CFG, WEIGHTS, SPARSITY = "cfg.json", "sae_weights.safetensors", "sparsity.safetensors"
ARCHITECTURES = ("standard", "gated", "jumprelu", "topk", "abstopk", "transcoder", "skip_transcoder",
                 "jumprelu_transcoder")
TRANSCODERS = ("transcoder", "skip_transcoder", "jumprelu_transcoder")


def is_saelens_dir(p: Path) -> bool:
    return (p / WEIGHTS).is_file()


def _activation(cfg: dict[str, Any], arch: str, cfg_path: Path) -> tuple[str, int | None]:
    """(activation rule, k) for an architecture; pre-6.0 'standard' SAEs may name topk/tanh-relu in activation_fn."""
    fn = cfg.get("activation_fn_str") or cfg.get("activation_fn") or "relu"
    kwargs = cfg.get("activation_fn_kwargs") or {}

    def k_field() -> int:
        k = cfg.get("k", kwargs.get("k") if isinstance(kwargs, dict) else None)
        return cfg_int({"k": k}, "k", cfg_path)  # missing -> "missing required field 'k'"

    if arch in ("jumprelu", "jumprelu_transcoder"):
        return "jumprelu", None
    if arch == "gated":
        return "gated", None
    if arch == "abstopk" or (arch in ("standard", "topk") and fn == "abstopk"):  # signed: top-k of |pre|, no ReLU
        return "abstopk", k_field()
    if arch == "topk" or (arch == "standard" and fn == "topk"):
        return "topk_relu", k_field()
    if arch == "standard" and fn not in ("relu", "tanh-relu"):
        raise ConfigError(f"{cfg_path}: activation_fn {fn!r} is not supported (expected relu, tanh-relu, topk or abstopk)")
    return ("tanh_relu" if fn == "tanh-relu" else "relu"), None


def load_saelens(
    folder: Path,
    *,
    source: str,
    id: str,
    hookpoint: str | None,
    device: str | torch.device,
    dtype: torch.dtype,
    norm_scaling_factor: float | None = None,
) -> LinearDictionary:
    cfg_path, w_path = folder / CFG, folder / WEIGHTS
    cfg = read_json(cfg_path)
    meta = cfg.get("metadata") or cfg.get("meta") or {}
    if not isinstance(meta, dict):
        raise ConfigError(f"{cfg_path}: field 'metadata' must be an object, got {type(meta).__name__}")
    arch = cfg.get("architecture") or "standard"
    if arch not in ARCHITECTURES:
        raise ConfigError(f"{cfg_path}: architecture {arch!r} is not supported (expected one of {', '.join(ARCHITECTURES)})")
    transcoder = arch in TRANSCODERS
    d_in, d_sae = cfg_int(cfg, "d_in", cfg_path), cfg_int(cfg, "d_sae", cfg_path)
    activation, k = _activation(cfg, arch, cfg_path)
    if k is not None and k > d_sae:
        raise ConfigError(f"{cfg_path}: k={k} exceeds d_sae={d_sae}")
    apply_b_dec = cfg_bool(cfg, "apply_b_dec_to_input", cfg_path, True) and not transcoder
    rescale = cfg_bool(cfg, "rescale_acts_by_decoder_norm", cfg_path, False) and activation == "topk_relu"

    raw = cfg.get("normalize_activations")  # pre-6.0 configs may hold a bool here
    norm = "none" if raw is None or raw is False else "expected_average_only_in" if raw is True else raw
    input_scale = None
    if norm == "expected_average_only_in":
        # SAELens folds a dataset-level factor that lives in its release directory, not in the checkpoint;
        # its load_from_disk applies nothing. Make the choice explicit instead of silently mis-scaling.
        if norm_scaling_factor is None:
            raise ConfigError(
                f"{cfg_path}: normalize_activations='expected_average_only_in' needs the dataset norm scaling factor,"
                " which the checkpoint does not store; pass norm_scaling_factor=<float> (1.0 = no scaling, as SAELens"
                " load_from_disk does)"
            )
        input_scale, norm = float(norm_scaling_factor), "none"
    elif norm_scaling_factor is not None:
        raise ConfigError(f"{cfg_path}: norm_scaling_factor given but normalize_activations is {norm!r}")
    if norm not in ("none", "constant_norm_rescale", "layer_norm"):
        raise ConfigError(
            f"{cfg_path}: normalize_activations {norm!r} is not supported (expected none, expected_average_only_in,"
            " constant_norm_rescale or layer_norm)"
        )

    # the decoder stays as stored and mapped: extraction never reads it (LinearDictionary converts it on first use)
    t = read_safetensors(w_path, dtype, keep=("W_dec",))
    W_enc, W_dec, b_dec = (need_tensor(t, n, w_path) for n in ("W_enc", "W_dec", "b_dec"))
    check_shape(w_path, "W_enc", W_enc, (d_in, d_sae), f"(d_in={d_in}, d_sae={d_sae}) from {CFG}")
    if W_dec.ndim != 2:
        raise ConfigError(f"{w_path}: W_dec has shape {tuple(W_dec.shape)}, expected 2 dims (d_sae, d_out)")
    if transcoder:
        d_out = cfg_int(cfg, "d_out", cfg_path, default=int(W_dec.shape[1]))
        d_out_src = f"from {CFG}" if "d_out" in cfg else "from W_dec"
    else:
        d_out, d_out_src = d_in, f"from {CFG}"
    check_shape(w_path, "W_dec", W_dec, (d_sae, d_out), f"(d_sae={d_sae}, d_out={d_out}) {d_out_src}")
    check_shape(w_path, "b_dec", b_dec, (d_out,), f"(d_out={d_out},) {d_out_src}")
    vec = f"(d_sae={d_sae},) from {CFG}"
    extra: dict[str, torch.Tensor | None] = {}
    if activation == "gated":
        for n in ("b_gate", "b_mag", "r_mag"):
            extra[n] = need_tensor(t, n, w_path)
            check_shape(w_path, n, extra[n], (d_sae,), vec)
        b_enc = None
    else:
        b_enc = need_tensor(t, "b_enc", w_path)
        check_shape(w_path, "b_enc", b_enc, (d_sae,), vec)
    if arch == "skip_transcoder":  # SAELens SkipTranscoder: W_skip [d_out, d_in], out += x @ W_skipᵀ
        extra["W_skip"] = need_tensor(t, "W_skip", w_path)
        check_shape(w_path, "W_skip", extra["W_skip"], (d_out, d_in), f"(d_out={d_out}, d_in={d_in})")
    if activation == "jumprelu":
        # Training checkpoints keep log_threshold; inference ones keep threshold.
        thr = t["log_threshold"].exp() if "log_threshold" in t and "threshold" not in t else need_tensor(
            t, "threshold", w_path
        )
        check_shape(w_path, "threshold", thr, (d_sae,), vec)
        extra["threshold"] = thr

    log_sparsity = None
    if (folder / SPARSITY).is_file():
        s = read_safetensors(folder / SPARSITY)
        log_sparsity = need_tensor(s, "sparsity", folder / SPARSITY)
        check_shape(folder / SPARSITY, "sparsity", log_sparsity, (d_sae,), vec)
        log_sparsity = log_sparsity.float()

    hook_in = meta.get("hook_name") or cfg.get("hook_name") or cfg.get("hook_point")
    hook_out = meta.get("hook_name_out") or cfg.get("hook_name_out")
    if hookpoint is None:
        # A transcoder's hookpoint is the module whose input it reads (the module writing hook_name_out).
        hookpoint = (hook_out or None) if transcoder else hook_in

    f = lambda v: to_float(v, dtype, device) if v is not None else None  # noqa: E731
    return LinearDictionary(
        format="saelens", source=source, id=id, hookpoint=hookpoint, transcoder=transcoder,
        W_enc=f(W_enc).T, b_enc=f(b_enc), W_dec=W_dec, b_dec=f(b_dec),
        activation=activation, k=k, threshold=f(extra.get("threshold")),
        b_gate=f(extra.get("b_gate")), b_mag=f(extra.get("b_mag")), r_mag=f(extra.get("r_mag")),
        subtract_b_dec=apply_b_dec, input_norm=norm, input_scale=input_scale, rescale_by_decoder_norm=rescale,
        architecture=arch, cfg=cfg, log_sparsity=log_sparsity,
        input_hookpoint=hook_in if transcoder else None, W_skip=f(extra.get("W_skip")),
    )
