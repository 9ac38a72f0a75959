"""A small TopK SAE / transcoder trainer (CPU-sized) that writes sparsify-format checkpoints.

The recipe follows sparsify / Gao et al. at small scale: b_dec starts at the target mean, decoder rows are kept
unit-norm (the gradient along each row is removed, rows renormalised after each step), loss = FVU + auxk_alpha·AuxK,
where AuxK lets latents dead for `dead_after_tokens` tokens predict the residual so they come back.
Output: `out_dir/<hookpoint>/cfg.json` + `sae.safetensors`, loadable by load_dictionary and by sparsify itself.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from autointerp.errors import ConfigError


class TopKSAE(nn.Module):
    """Same parameter names and encoder as sparsify's SparseCoder (topk activation)."""

    def __init__(self, d_in: int, n_latents: int, k: int, d_out: int, transcode: bool, generator: torch.Generator):
        super().__init__()
        self.k, self.transcode = k, transcode
        self.encoder = nn.Linear(d_in, n_latents)
        dec = torch.randn(n_latents, d_out, generator=generator)
        self.W_dec = nn.Parameter(dec / dec.norm(dim=1, keepdim=True))
        with torch.no_grad():
            # An autoencoder's encoder starts as the decoder's transpose (scaled), a transcoder's at random.
            enc = self.W_dec.data if not transcode else torch.randn(n_latents, d_in, generator=generator)
            self.encoder.weight.copy_(enc / math.sqrt(d_in))
            self.encoder.bias.zero_()
        self.b_dec = nn.Parameter(torch.zeros(d_out))

    def pre_acts(self, x: Tensor) -> Tensor:
        return F.relu(self.encoder(x if self.transcode else x - self.b_dec))

    def encode(self, x: Tensor) -> Tensor:
        """Dense codes (ReLU, then top-k: sparsify's order)."""
        vals, idx = self.pre_acts(x).topk(self.k, dim=-1, sorted=False)
        return vals.new_zeros(*x.shape[:-1], self.W_dec.shape[0]).scatter_(-1, idx, vals)

    def decode(self, vals: Tensor, idx: Tensor) -> Tensor:
        # Dense codes @ W_dec: on CPU the matmul (and its backward) beats gathering [B, k, d] decoder rows ~2x.
        codes = torch.zeros(vals.shape[0], self.W_dec.shape[0], dtype=vals.dtype, device=vals.device)
        return codes.scatter(-1, idx, vals) @ self.W_dec + self.b_dec


@dataclass
class TrainResult:
    path: Path  # out_dir/<hookpoint>
    fvu: float  # fraction of variance unexplained on all training data, final weights
    dead_fraction: float  # latents that never fire on the training data
    steps: int
    model: TopKSAE = field(repr=False)


def train_topk_sae(
    acts: Tensor,
    n_latents: int,
    k: int,
    *,
    out_dir: str | Path,
    hookpoint: str,
    targets: Tensor | None = None,
    transcode: bool = False,
    steps: int = 1000,
    epochs: int | None = None,
    lr: float | None = None,
    batch_size: int = 256,
    auxk_alpha: float = 1 / 32,
    dead_after_tokens: int | None = None,
    seed: int = 0,
    num_threads: int | None = None,
    progress: bool = False,
    decoder_bias: bool = True,
    k_start: int | None = None,
) -> TrainResult:
    """Train on acts [N, d_in] (a transcoder predicts targets [N, d_out] from them); `epochs` overrides `steps`.

    Deterministic for a given seed (and thread count). The seed alone draws the initial decoder: two SAEs of one
    seed on different hookpoints start from the same rows (give them different seeds to compare them). `num_threads` sets torch's intra-op threads for the run
    only: small SAEs train much faster on one thread than on busy shared cores. `decoder_bias=False` keeps b_dec at
    0 (meta-dictionaries: a learned offset would absorb the directions shared by unit-norm rows).
    `k_start` (> k): train with the top-k_start latents at first, k falling linearly to `k` over the first half of
    the steps. With about as many latents as true directions, a fixed small k lets one latent settle on the sum of
    two directions while another starves (two latents cannot share a row's k slots while they split them); a wide
    k early leaves room for the split.
    """
    if acts.ndim != 2 or not acts.is_floating_point():
        raise ConfigError(f"train_topk_sae: acts must be a float tensor [N, d_in], got {tuple(acts.shape)} {acts.dtype}")
    if transcode and targets is None:
        raise ConfigError("train_topk_sae: transcode=True needs targets [N, d_out] (the module's outputs)")
    y_all = (targets if transcode else acts).float()
    if y_all.ndim != 2 or y_all.shape[0] != acts.shape[0]:
        raise ConfigError(f"train_topk_sae: targets must be [N={acts.shape[0]}, d_out], got {tuple(y_all.shape)}")
    if not 1 <= k <= n_latents:
        raise ConfigError(f"train_topk_sae: need 1 <= k <= n_latents, got k={k}, n_latents={n_latents}")
    if k_start is not None and not k <= k_start <= n_latents:
        raise ConfigError(f"train_topk_sae: need k <= k_start <= n_latents, got k_start={k_start}, k={k}")
    if not hookpoint or "/" in hookpoint or hookpoint in (".", ".."):
        raise ConfigError(f"train_topk_sae: hookpoint {hookpoint!r} must be a plain folder name")
    x_all = acts.float()
    n, d_in = x_all.shape
    batch_size = min(batch_size, n)
    steps = epochs * math.ceil(n / batch_size) if epochs is not None else steps
    lr = lr if lr is not None else 2e-4 / math.sqrt(n_latents / 2**14)  # sparsify's width-scaled default
    dead_after = dead_after_tokens or max(n, 20 * batch_size)  # default: silent for a whole pass over the data

    with _threads(num_threads):
        sae = _fit(x_all, y_all, n_latents, k, transcode, steps, lr, batch_size, auxk_alpha, dead_after, seed,
                   progress, decoder_bias, k_start)
        fvu, dead_fraction = _evaluate(sae, x_all, y_all, batch_size)
    path = _save(sae, Path(out_dir) / hookpoint, d_in, n_latents, k, transcode)
    return TrainResult(path=path, fvu=fvu, dead_fraction=dead_fraction, steps=steps, model=sae)


@contextmanager
def _threads(n: int | None):
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _fit(x_all, y_all, n_latents, k, transcode, steps, lr, batch_size, auxk_alpha, dead_after, seed,
         progress: bool = False, decoder_bias: bool = True, k_start: int | None = None) -> TopKSAE:
    n, d_in, d_out = x_all.shape[0], x_all.shape[1], y_all.shape[1]
    g = torch.Generator().manual_seed(seed)
    sae = TopKSAE(d_in, n_latents, k, d_out, transcode, g)
    if decoder_bias:
        with torch.no_grad():
            sae.b_dec.copy_(y_all.mean(0))
    else:
        sae.b_dec.requires_grad_(False)  # stays 0: Adam skips a parameter with no gradient
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    since_fired = torch.zeros(n_latents, dtype=torch.long)
    order, pos = torch.randperm(n, generator=g), 0

    for step in tqdm(range(steps), desc=f"train SAE {n_latents}x k={k}", unit="step", dynamic_ncols=True,
                     disable=not progress):
        if pos + batch_size > n:
            order, pos = torch.randperm(n, generator=g), 0
        idx = order[pos : pos + batch_size]
        pos += batch_size
        x, y = x_all[idx], y_all[idx]
        pre = sae.pre_acts(x)
        k_now = k if k_start is None else round(k_start + (k - k_start) * min(1.0, step / max(1, steps // 2)))
        vals, top = pre.topk(k_now, dim=-1, sorted=False)
        err = y - sae.decode(vals, top)
        total_var = (y - y.mean(0)).pow(2).sum()
        loss = err.pow(2).sum() / total_var

        since_fired += batch_size
        since_fired[top[vals > 0].unique()] = 0
        dead = since_fired > dead_after
        if auxk_alpha > 0 and (num_dead := int(dead.sum())) > 0:
            k_aux = min(max(d_out // 2, 1), num_dead)
            aux_vals, aux_idx = torch.where(dead, pre, -torch.inf).topk(k_aux, dim=-1, sorted=False)  # dead only
            # dense codes @ W_dec: gathering [B, k_aux, d] decoder rows would move ~100x more memory per step
            e_hat = torch.zeros_like(pre).scatter_(-1, aux_idx, aux_vals) @ sae.W_dec
            scale = min(num_dead / max(d_out // 2, 1), 1.0)
            loss = loss + auxk_alpha * scale * (e_hat - err.detach()).pow(2).sum() / total_var

        opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            # Keep the unit-norm constraint: drop the gradient along each decoder row, step, renormalise.
            W, gW = sae.W_dec.data, sae.W_dec.grad
            gW -= (gW * W).sum(1, keepdim=True) * W
            opt.step()
            W /= W.norm(dim=1, keepdim=True) + torch.finfo(W.dtype).eps
    return sae


@torch.no_grad()
def _evaluate(sae: TopKSAE, x_all: Tensor, y_all: Tensor, batch_size: int) -> tuple[float, float]:
    sq_err, fired = 0.0, torch.zeros(sae.W_dec.shape[0], dtype=torch.bool)
    for i in range(0, x_all.shape[0], batch_size):
        vals, top = sae.pre_acts(x_all[i : i + batch_size]).topk(sae.k, dim=-1, sorted=False)
        sq_err += float((y_all[i : i + batch_size] - sae.decode(vals, top)).pow(2).sum())
        fired[top[vals > 0]] = True
    total_var = float((y_all - y_all.mean(0)).pow(2).sum())
    return sq_err / total_var, 1.0 - float(fired.float().mean())


def _save(sae: TopKSAE, folder: Path, d_in: int, n_latents: int, k: int, transcode: bool) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: p.detach().contiguous() for name, p in sae.state_dict().items()}
    save_file(tensors, str(folder / "sae.safetensors"))
    cfg = {
        "activation": "topk", "expansion_factor": max(1, n_latents // d_in), "normalize_decoder": True,
        "num_latents": n_latents, "k": k, "multi_topk": False, "skip_connection": False, "transcode": transcode,
        "d_in": d_in,
    }
    (folder / "cfg.json").write_text(json.dumps(cfg, indent=1))
    return folder
