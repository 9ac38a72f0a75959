"""Gemma Scope: `layer_N/width_W/average_l0_K/params.npz` with W_enc [d_in, n], W_dec [n, d_out], b_enc, b_dec,
threshold. JumpReLU encoder, b_dec never subtracted: codes = relu(pre) * (pre > threshold), pre = x @ W_enc + b_enc
(the same as pre * (pre > threshold) for the released, positive thresholds).

Sizes live only in folder names, so they are taken from the arrays. The site comes from the release folder name
(google/gemma-scope-<model>-<res|mlp|att|transcoders>), the layer from `layer_N`.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from autointerp.errors import ConfigError

from ._files import check_shape, need_tensor, read_npz, to_float
from .base import LinearDictionary

WEIGHTS = "params.npz"
# res -> residual stream after the block; mlp -> MLP output; att -> attention hook_z (concatenated head outputs,
# the input of o_proj: d_in = n_heads * d_head); transcoders read the MLP input and predict its output.
_SITES = {"res": "resid_post", "mlp": "mlp_out", "att": "attn_z", "transcoders": "mlp_out"}
_RELEASE = re.compile(r"gemma-scope-.*?-(res|mlp|att|transcoders)\b")


def is_gemmascope_dir(p: Path) -> bool:
    return (p / WEIGHTS).is_file()


def site_from_path(path: Path) -> tuple[str | None, bool]:
    """(hookpoint, is_transcoder) from a Gemma Scope path; resid_post when the release is not named."""
    s = path.as_posix()
    if re.search(r"(^|/)embedding(/|$)", s):
        raise ConfigError(f"{path}: Gemma Scope embedding SAEs are not supported (they need input rescaling)")
    layers = re.findall(r"(?:^|/)layer_(\d+)(?:/|$)", s)
    m = _RELEASE.search(s)
    kind = m.group(1) if m else "res"
    hookpoint = f"{_SITES[kind]}.{layers[-1]}" if layers else None
    return hookpoint, kind == "transcoders"


def load_gemmascope(
    npz: Path, *, source: str, id: str, hookpoint: str | None, device: str | torch.device, dtype: torch.dtype
) -> LinearDictionary:
    # Some copies name the weights w_enc/w_dec (SAELens maps "w_" to "W_"); accept both.
    a = {("W_" + k[2:] if k.startswith("w_") else k): v for k, v in read_npz(npz).items()}
    W_enc, W_dec, b_enc, b_dec, thr = (need_tensor(a, n, npz) for n in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"))
    if W_enc.ndim != 2:
        raise ConfigError(f"{npz}: W_enc has shape {tuple(W_enc.shape)}, expected 2 dims (d_in, n_latents)")
    d_in, n = (int(s) for s in W_enc.shape)
    path_hookpoint, transcoder = site_from_path(npz)
    d_out = int(W_dec.shape[1]) if transcoder and W_dec.ndim == 2 else d_in
    src = f"(n_latents={n}, d_out={d_out}) from W_enc" if transcoder else f"(n_latents={n}, d_in={d_in}) from W_enc"
    check_shape(npz, "W_dec", W_dec, (n, d_out), src)
    check_shape(npz, "b_enc", b_enc, (n,), f"(n_latents={n},) from W_enc")
    check_shape(npz, "threshold", thr, (n,), f"(n_latents={n},) from W_enc")
    check_shape(npz, "b_dec", b_dec, (d_out,), f"(d_out={d_out},) from W_dec")
    f = lambda v: to_float(v, dtype, device)  # noqa: E731
    return LinearDictionary(
        format="gemmascope", source=source, id=id,
        hookpoint=hookpoint if hookpoint is not None else path_hookpoint, transcoder=transcoder,
        W_enc=f(W_enc).T, b_enc=f(b_enc), W_dec=f(W_dec), b_dec=f(b_dec), activation="jumprelu", threshold=f(thr),
        architecture="jumprelu", cfg={"d_in": d_in, "d_sae": n, "path": str(npz)},
    )
