"""Qwen-Scope (SAEs for Qwen3 / Qwen3.5, dense and MoE): one `layer{N}.sae.pt` per decoder layer, a plain torch dict
of W_enc (d_sae, d_model), W_dec (d_model, d_sae) — both transposed against SAELens —, b_enc (d_sae,), b_dec (d_model,).

Encode, as the model cards' own "Feature Activation Extraction" code does it (Qwen/SAE-Res-Qwen3-8B-Base-W64K-L0_50
and its siblings): x is the output of decoder layer N (a forward hook on `model.layers[N]`, i.e. resid_post.N);
pre = x @ W_encᵀ + b_enc, b_dec never subtracted; the k largest pre-activations of each token are kept, the rest
zeroed. The card applies no ReLU, so a top-k value below zero (a token with fewer than k positive pre-activations)
stays negative there; here it is written as 0 (activation "topk_relu": top-k first, then ReLU), because the collector
keeps firing, positive codes. Every positive code equals the card's; only such negative entries differ.

k: no file of the release states it. The card's code hardcodes it (50 in the L0_50 repos) and the repo name ends in
`L0_<k>` (L0_50, L0_100). So k is, in this order: `k` from a `cfg.json` beside the layer files (the way to override);
the last `L0_<k>` in the file's path (a hub download keeps the repo name in its cache path); else 50 (the card demo's
value, the smaller released k), with a warning.

Sizes come from the biases (d_sae = len(b_enc), d_model = len(b_dec)), so a transposed matrix is told apart from a
right one. The file is read with `weights_only=True` (no code runs from it) and memory-mapped when it can be.
decode = codes @ W_decᵀ + b_dec (the card's demo shows no decode; the usual SAE form, W_dec's columns the directions).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from torch import Tensor

from autointerp.errors import ConfigError

from ._files import cfg_int, check_shape, need_tensor, one_line, read_json, to_float
from .base import LinearDictionary

log = logging.getLogger(__name__)

SIDECAR = "cfg.json"
DEFAULT_K = 50
_FILE = re.compile(r"^layer(\d+)\.sae\.pt$")
_L0 = re.compile(r"L0_(\d+)(?![0-9])")


def read_pt(path: Path) -> dict[str, Tensor]:
    """A torch dict of tensors, read with weights_only (mapped when the file is in the zip format)."""
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        try:
            data = torch.load(path, weights_only=True, map_location="cpu", mmap=True)
        except RuntimeError as e:  # the legacy (pre-zip) format cannot be mapped: read it whole
            if "mmap" not in str(e):
                raise
            data = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # an UnpicklingError for objects weights_only refuses; others for corrupt files
        # torch's refusal is a page of advice; its one informative sentence names the object it refused
        m = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\.\s|\n|$)", str(e))
        why = m.group(1) if m else (str(e).strip().splitlines() or [""])[0]
        raise ConfigError(f"{path}: not a plain dict of tensors that torch.load(weights_only=True) reads "
                          f"({type(e).__name__}: {one_line(Exception(why), 160)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: holds a {type(data).__name__}, expected a dict of tensors W_enc, W_dec, b_enc,"
                          " b_dec")
    return data


def pick_k(path: Path) -> tuple[int, str]:
    """(k, where it came from): see the module docstring."""
    side = path.parent / SIDECAR
    if side.is_file():
        cfg = read_json(side)
        if cfg.get("k") is not None:
            return cfg_int(cfg, "k", side), str(side)
    # the path as given first: a hub cache's snapshot file is a link into blobs/ (under the same repo folder)
    found = _L0.findall(path.absolute().as_posix()) or _L0.findall(path.resolve().as_posix())
    if found:
        return int(found[-1]), "the path's L0_<k>"
    log.warning("%s: no k in a %s beside it nor L0_<k> in its path; using k=%d (the Qwen-Scope L0_50 releases); "
                "put {\"k\": K} in %s to override", path, SIDECAR, DEFAULT_K, side)
    return DEFAULT_K, "default"


def load_qwenscope(
    path: Path, *, source: str, id: str, hookpoint: str | None, device: str | torch.device, dtype: torch.dtype
) -> LinearDictionary:
    t = read_pt(path)
    W_enc, W_dec, b_enc, b_dec = (need_tensor(t, n, path) for n in ("W_enc", "W_dec", "b_enc", "b_dec"))
    for name, v in (("W_enc", W_enc), ("W_dec", W_dec), ("b_enc", b_enc), ("b_dec", b_dec)):
        if not isinstance(v, Tensor) or not v.is_floating_point():
            what = f"a {v.dtype} tensor" if isinstance(v, Tensor) else f"a {type(v).__name__}"
            raise ConfigError(f"{path}: '{name}' is {what}, expected a float tensor")
    for name, v in (("b_enc", b_enc), ("b_dec", b_dec)):
        if v.ndim != 1:
            raise ConfigError(f"{path}: {name} has shape {tuple(v.shape)}, expected 1 dim")
    n, d = int(b_enc.shape[0]), int(b_dec.shape[0])
    sizes = f"(d_sae={n} from b_enc, d_model={d} from b_dec)"
    check_shape(path, "W_enc", W_enc, (n, d), f"{(n, d)} {sizes}; Qwen-Scope stores W_enc as (d_sae, d_model)")
    check_shape(path, "W_dec", W_dec, (d, n), f"{(d, n)} {sizes}; Qwen-Scope stores W_dec as (d_model, d_sae)")
    k, k_from = pick_k(path)
    if k > n:
        raise ConfigError(f"{path}: k={k} (from {k_from}) exceeds d_sae={n}")
    m = _FILE.match(path.name)
    # the card hooks the output of model.layers[N]: our resid_post.N
    hp = hookpoint if hookpoint is not None else (f"resid_post.{m.group(1)}" if m else None)
    f = lambda v: to_float(v, dtype, device)  # noqa: E731
    return LinearDictionary(
        format="qwenscope", source=source, id=id, hookpoint=hp, transcoder=False,
        # rows [n_latents, d_in] as stored; the decoder transposed as a view, kept as stored until first read
        W_enc=f(W_enc), b_enc=f(b_enc), W_dec=W_dec.T, b_dec=f(b_dec),
        activation="topk_relu", k=k, subtract_b_dec=False, architecture="topk",
        cfg={"d_model": d, "d_sae": n, "k": k, "k_from": k_from, "path": str(path)},
    )
