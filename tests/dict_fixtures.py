"""Writers of small random dictionary checkpoints in each on-disk format (for tests).

Each writer returns the stored tensors as float64 numpy arrays (after any bfloat16 rounding), so a test can
recompute the encoder independently.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file


def _save(tensors: dict[str, np.ndarray], path: Path, dtype: torch.dtype) -> dict[str, np.ndarray]:
    t = {k: torch.tensor(v).to(dtype).contiguous() for k, v in tensors.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(t, str(path))
    return {k: v.to(torch.float64).numpy() for k, v in t.items()}


def _write_cfg(folder: Path, cfg: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))


def write_sparsify(
    folder: Path,
    *,
    d_in: int = 8,
    n: int = 16,
    k: int = 4,
    activation: str = "topk",
    transcode: bool = False,
    d_out: int | None = None,
    skip: bool = False,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    num_latents_in_cfg: bool = True,
    cfg_overrides: dict[str, Any] | None = None,
) -> dict[str, np.ndarray]:
    r = np.random.default_rng(seed)
    d_out = d_out or d_in
    w = {
        "encoder.weight": r.normal(size=(n, d_in)) / np.sqrt(d_in),
        "encoder.bias": r.normal(size=n) * 0.3,
        "W_dec": r.normal(size=(n, d_out)),
        "b_dec": r.normal(size=d_out),
    }
    if skip:
        w["W_skip"] = r.normal(size=(d_out, d_in)) * 0.1
    stored = _save(w, folder / "sae.safetensors", dtype)
    cfg = {
        "activation": activation,
        "expansion_factor": n // d_in if not num_latents_in_cfg else 32,
        "normalize_decoder": True,
        "num_latents": n if num_latents_in_cfg else 0,
        "k": k,
        "multi_topk": False,
        "skip_connection": skip,
        "transcode": transcode,
        "d_in": d_in,
        **(cfg_overrides or {}),
    }
    _write_cfg(folder, cfg)
    return stored


def write_saelens(
    folder: Path,
    *,
    arch: str = "standard",
    d_in: int = 8,
    d_sae: int = 16,
    d_out: int | None = None,
    k: int = 4,
    style: str = "6x",  # 6x | pre6 (flat, activation_fn_str) | oldest (no architecture/apply_b_dec_to_input)
    apply_b_dec_to_input: bool = True,
    normalize_activations: Any = "none",
    rescale_acts_by_decoder_norm: bool = False,
    hook_name: str = "blocks.3.hook_resid_pre",
    hook_name_out: str | None = None,
    activation_fn: str = "relu",
    sparsity: bool = False,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    cfg_overrides: dict[str, Any] | None = None,
) -> dict[str, np.ndarray]:
    r = np.random.default_rng(seed)
    transcoder = arch in ("transcoder", "skip_transcoder", "jumprelu_transcoder")
    d_out = d_out or d_in
    W_dec = r.normal(size=(d_sae, d_out))
    W_dec *= r.uniform(0.5, 2.0, size=(d_sae, 1)) / np.linalg.norm(W_dec, axis=1, keepdims=True)  # non-unit norms
    w = {
        "W_enc": r.normal(size=(d_in, d_sae)) / np.sqrt(d_in),
        "W_dec": W_dec,
        "b_dec": r.normal(size=d_out) * 0.5,
    }
    if arch == "gated":
        w |= {"b_gate": r.normal(size=d_sae) * 0.3, "b_mag": r.normal(size=d_sae) * 0.3, "r_mag": r.normal(size=d_sae) * 0.3}
    else:
        w["b_enc"] = r.normal(size=d_sae) * 0.3
    if arch in ("jumprelu", "jumprelu_transcoder"):
        w["threshold"] = r.uniform(0.0, 0.6, size=d_sae)
    if arch == "skip_transcoder":
        w["W_skip"] = r.normal(size=(d_out, d_in)) * 0.1
    stored = _save(w, folder / "sae_weights.safetensors", dtype)
    if sparsity:
        stored["sparsity"] = _save({"sparsity": r.uniform(-6, -1, size=d_sae)}, folder / "sparsity.safetensors", torch.float32)["sparsity"]

    if style == "6x":
        meta = {"model_name": "tiny", "hook_name": hook_name, "sae_lens_version": "6.5.1"}
        if hook_name_out:
            meta["hook_name_out"] = hook_name_out
        cfg: dict[str, Any] = {
            "architecture": arch, "d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": "cpu",
            "apply_b_dec_to_input": apply_b_dec_to_input, "normalize_activations": normalize_activations,
            "reshape_activations": "none", "metadata": meta,
        }
        if arch in ("topk", "abstopk"):
            cfg |= {"k": k, "rescale_acts_by_decoder_norm": rescale_acts_by_decoder_norm}
        if transcoder:
            cfg["d_out"] = d_out
    elif style == "pre6":
        cfg = {
            "architecture": arch, "d_in": d_in, "d_sae": d_sae, "dtype": "torch.float32", "device": "cpu",
            "model_name": "tiny", "hook_name": hook_name, "hook_layer": 3, "hook_head_index": None,
            "activation_fn_str": activation_fn, "activation_fn_kwargs": {"k": k} if activation_fn == "topk" else {},
            "apply_b_dec_to_input": apply_b_dec_to_input, "normalize_activations": normalize_activations,
            "finetuning_scaling_factor": False, "sae_lens_training_version": "3.13.0",
        }
    else:  # oldest: flat, hook_point, no architecture / apply_b_dec_to_input
        cfg = {"d_in": d_in, "d_sae": d_sae, "dtype": "torch.float32", "hook_point": hook_name, "model_name": "tiny"}
    cfg |= cfg_overrides or {}
    _write_cfg(folder, cfg)
    return stored


def write_gemmascope(
    npz: Path, *, d_in: int = 8, n: int = 16, d_out: int | None = None, seed: int = 0, lower_keys: bool = False
) -> dict[str, np.ndarray]:
    r = np.random.default_rng(seed)
    d_out = d_out or d_in
    w = {
        "W_enc": (r.normal(size=(d_in, n)) / np.sqrt(d_in)).astype(np.float32),
        "W_dec": r.normal(size=(n, d_out)).astype(np.float32),
        "b_enc": (r.normal(size=n) * 0.3).astype(np.float32),
        "b_dec": (r.normal(size=d_out) * 0.5).astype(np.float32),
        "threshold": r.uniform(0.0, 0.6, size=n).astype(np.float32),
    }
    npz.parent.mkdir(parents=True, exist_ok=True)
    np.savez(npz, **{("w_" + k[2:] if lower_keys and k.startswith("W_") else k): v for k, v in w.items()})
    return {k: v.astype(np.float64) for k, v in w.items()}


def make_inputs(d_in: int, shape: tuple[int, ...] = (3, 5), seed: int = 1, offset: float = 0.7) -> torch.Tensor:
    """Activations [*shape, d_in] with a non-zero mean, so b_dec subtraction visibly matters."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, d_in, generator=g) + offset
