"""Fit a semi-nonnegative matrix factorization (SNMF) of MLP activations, for `dictionaries/snmf.py`.

A (d_mlp × tokens) ≈ F · Gᵀ with F mixed-sign (the features: combinations of neurons) and G ≥ 0 (each token's codes),
after Shafran, Geiger & Geva, "Decomposing MLP activations into interpretable features via semi-nonnegative matrix
factorization". The solver is the one of Ding, Li & Jordan ("Convex and semi-nonnegative matrix factorizations"):
G starts from k-means cluster indicators + 0.2; then, a fixed number of times, F = A G (GᵀG)⁻¹ (least squares) and the
multiplicative update

    G ← G ⊙ sqrt( ((AᵀF)⁺ + G (FᵀF)⁻) / ((AᵀF)⁻ + G (FᵀF)⁺) ),   M⁺ = (|M| + M) / 2,  M⁻ = (|M| − M) / 2,

which keeps G ≥ 0 and never increases ‖A − F Gᵀ‖. At the end F is refitted to the final G and its columns are scaled
to unit norm, G's columns by the inverse (F Gᵀ unchanged): codes then read in units of the activation norm.

Here activations are tokens-major, `acts` [tokens, d_mlp] (Aᵀ), as everywhere else in autointerp.

    windows, acts, ignore = collect_windows(subject, "mlp_neurons.5", CorpusSpec(n_tokens=4096, ctx_len=32))
    F, G = fit_snmf(acts[~ignore], k=64, n_iter=50, seed=0)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .corpus import CorpusSpec, iter_windows
from .errors import ConfigError
from .subject import SubjectModel

_EPS = 1e-12


def _pos(m: Tensor) -> Tensor:
    return m.clamp(min=0)


def _neg(m: Tensor) -> Tensor:
    return (-m).clamp(min=0)


def _least_squares_F(acts: Tensor, G: Tensor) -> Tensor:
    """argmin_F ‖acts − G Fᵀ‖: F = Aᵀ G (GᵀG)⁻¹ [d, K]. A tiny ridge keeps it solvable when a code column died
    (multiplicative updates never revive an exact zero)."""
    gram = G.T @ G
    ridge = 1e-9 * gram.diagonal().mean().clamp(min=_EPS)
    gram = gram + ridge * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram, G.T @ acts).T


def _kmeans_init(acts: Tensor, k: int, gen: torch.Generator, n_iter: int) -> Tensor:
    """Cluster indicators + 0.2 (Ding et al.'s initialisation) from a seeded Lloyd k-means."""
    n = acts.shape[0]
    centers = acts[torch.randperm(n, generator=gen)[:k].to(acts.device)].clone()
    sq = (acts * acts).sum(1, keepdim=True)
    for _ in range(n_iter):
        labels = (sq - 2 * acts @ centers.T + (centers * centers).sum(1)).argmin(1)
        sums = torch.zeros_like(centers).index_add_(0, labels, acts)
        counts = torch.bincount(labels, minlength=k).to(acts.dtype)[:, None]
        centers = torch.where(counts > 0, sums / counts.clamp(min=1), centers)  # an empty cluster keeps its center
    labels = (sq - 2 * acts @ centers.T + (centers * centers).sum(1)).argmin(1)
    return torch.nn.functional.one_hot(labels, k).to(acts.dtype) + 0.2


@torch.no_grad()
def fit_snmf(acts: Tensor, k: int, *, n_iter: int = 50, seed: int = 0, kmeans_iter: int = 10,
             dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Semi-NMF of `acts` [tokens, d_mlp]: (F [d_mlp, k] with unit-norm columns, G [tokens, k] ≥ 0), float32, on
    acts' device. Deterministic for a seed (on one device); exactly `n_iter` updates."""
    if acts.ndim != 2:
        raise ConfigError(f"fit_snmf: activations must be [tokens, d_mlp], got shape {tuple(acts.shape)}")
    n, _ = acts.shape
    if not 1 <= k <= n:
        raise ConfigError(f"fit_snmf: k={k} must be between 1 and the number of tokens ({n})")
    if n_iter < 0:
        raise ConfigError(f"fit_snmf: n_iter must be >= 0, got {n_iter}")
    gen = torch.Generator().manual_seed(seed)
    A = acts.to(dtype)
    G = _kmeans_init(A, k, gen, kmeans_iter)
    for _ in range(n_iter):
        F = _least_squares_F(A, G)
        AtF, FtF = A @ F, F.T @ F
        num = _pos(AtF) + G @ _neg(FtF)
        den = _neg(AtF) + G @ _pos(FtF)
        G = G * torch.sqrt(num / den.clamp(min=_EPS))
    F = _least_squares_F(A, G)
    norms = F.norm(dim=0)
    scale = torch.where(norms > 0, norms, torch.ones_like(norms))
    return (F / scale).float(), (G * scale).float()


@torch.no_grad()
def collect_windows(subject: SubjectModel, hookpoint: str, spec: CorpusSpec, batch_size: int = 32,
                    max_norm_ratio: float = 5.0) -> tuple[np.ndarray, Tensor, Tensor]:
    """(windows [W, T] int32 token ids, acts [W·T, d] float32 on the CPU, ignore [W·T] bool) over the corpus:
    every position kept, so codes line up with windows; `ignore` marks what extraction ignores too (special tokens,
    activation norms over max_norm_ratio × the batch median), which a fit should leave out."""
    hook = subject.hookpoint(hookpoint)
    wins, acts, ign = [], [], []
    for batch in iter_windows(spec, subject.tokenizer, batch_size):
        ids = torch.from_numpy(batch).long()
        x = subject.capture(ids, [hook])[hook.name]
        ignore = subject.special_token_mask(ids).to(x.device) | subject.outlier_mask(x, max_norm_ratio)
        wins.append(np.asarray(batch, dtype=np.int32))
        acts.append(x.float().cpu().reshape(-1, x.shape[-1]))
        ign.append(ignore.cpu().reshape(-1))
    return np.concatenate(wins), torch.cat(acts), torch.cat(ign)


def fit_snmf_folder(subject: SubjectModel, hookpoint: str, spec: CorpusSpec, out: str | Path, *, k: int,
                    n_iter: int = 50, seed: int = 0, batch_size: int = 32, max_norm_ratio: float = 5.0) -> Path:
    """Collect `hookpoint` activations over the corpus, fit, and save an SNMF folder (dictionaries/snmf.py layout)
    with the codes G of every position of the windows: ignored positions are left out of the fit and get zero codes
    (what extraction gives them), so `snmf_import` can publish G as a cache."""
    from .dictionaries.snmf import save_snmf

    spec.validate()
    windows, acts, ignore = collect_windows(subject, hookpoint, spec, batch_size, max_norm_ratio)
    keep = ~ignore
    if int(keep.sum()) < k:
        raise ConfigError(f"fit-snmf: {int(keep.sum())} usable tokens, fewer than k={k}; raise --n-tokens")
    F, G_kept = fit_snmf(acts[keep].to(subject.device), k, n_iter=n_iter, seed=seed)
    G = torch.zeros(acts.shape[0], k)
    G[keep] = G_kept.cpu()
    cfg = {"hookpoint": hookpoint, "model": subject.spec, "model_dtype": str(subject.dtype).replace("torch.", ""),
           "corpus": spec.as_dict(), "n_iter": n_iter, "seed": seed,
           "max_norm_ratio": max_norm_ratio,
           "ignored_token_ids": sorted(int(i) for i in (subject.tokenizer.all_special_ids or []) if i is not None)}
    save_snmf(out, F.cpu(), G, tokens=windows, cfg=cfg)
    return Path(out)
