"""Whole-dictionary similarity: one number for two dictionaries (compare.py matches latent to latent).

  itda_jaccard(a, b)          ITDA dictionaries: |A ∩ B| / |A ∪ B| of their atom-index sets, each atom named by the
                              (sequence, token) of the prompt-set activation it came from (Leask et al. 2025). Only
                              meaningful for dictionaries built from the same prompt set in the same order.
  linear_cka(codes_a, codes_b) linear CKA (Kornblith et al. 2019) of two dictionaries' codes on the same tokens.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.sparse as sp

from .errors import ConfigError


def _index_rows(x) -> np.ndarray:
    """[n, 2] int64 atom indices from an ItdaDictionary, an array/tensor, or an ITDA folder / file / dictionary id."""
    if hasattr(x, "atom_indices"):
        x = x.atom_indices
    elif isinstance(x, (str, Path)):
        from .dictionaries.itda import ATOMS, INDICES, METADATA, read_atom_indices

        p = Path(x).expanduser()
        if p.is_file() and p.name in (ATOMS, INDICES, METADATA):
            p = p.parent
        if p.is_dir():
            x = read_atom_indices(p)
        else:  # a hub id (or a path that is not there: the loader's message says so)
            from .dictionaries import load_dictionary

            x = load_dictionary(str(x), format="itda").atom_indices
    a = np.asarray(x.cpu() if hasattr(x, "cpu") else x)
    if a.ndim != 2 or a.shape[1] != 2:
        raise ConfigError(f"itda_jaccard: atom indices have shape {a.shape}, expected [n_atoms, 2]")
    return a.astype(np.int64)


def itda_overlap(a, b) -> dict:
    """{n_a, n_b, shared, union, jaccard} of two ITDA dictionaries' atom-index sets (see itda_jaccard)."""
    sa = set(map(tuple, _index_rows(a).tolist()))
    sb = set(map(tuple, _index_rows(b).tolist()))
    union = len(sa | sb)
    if union == 0:
        raise ConfigError("itda_jaccard: both dictionaries are empty")
    shared = len(sa & sb)
    return {"n_a": len(sa), "n_b": len(sb), "shared": shared, "union": union, "jaccard": shared / union}


def itda_jaccard(a, b) -> float:
    """Jaccard index of two ITDA dictionaries' atom-index sets: |A ∩ B| / |A ∪ B| (duplicate rows count once).
    a, b: ItdaDictionary, [n, 2] arrays / tensors, or ITDA folders (or files in one, or hub ids)."""
    return itda_overlap(a, b)["jaccard"]


def _as_matrix(x, what: str):
    if sp.issparse(x):
        x = sp.csr_matrix(x, dtype=np.float64)
    else:
        x = np.asarray(x.detach().cpu() if hasattr(x, "detach") else x, dtype=np.float64)
        if x.ndim != 2:
            raise ConfigError(f"linear_cka: codes {what} have shape {x.shape}, expected [tokens, latents]")
    if 0 in x.shape:
        raise ConfigError(f"linear_cka: codes {what} are empty (shape {x.shape})")
    return x


def _centred_cross(x, y) -> np.ndarray:
    """Xcᵀ Yc [n_x, n_y] without centring (densifying) X or Y: Xᵀ Y - T μ_x μ_yᵀ."""
    t = x.shape[0]
    mx, my = np.asarray(x.mean(axis=0)).ravel(), np.asarray(y.mean(axis=0)).ravel()
    xy = x.T @ y
    xy = xy.toarray() if sp.issparse(xy) else np.asarray(xy)
    return xy - t * np.outer(mx, my)


def _centred_gram(x) -> np.ndarray:
    """H X Xᵀ H [T, T], H the centring matrix (rows and columns of the token Gram matrix made zero-mean)."""
    k = x @ x.T
    k = k.toarray() if sp.issparse(k) else np.asarray(k)
    return k - k.mean(axis=0, keepdims=True) - k.mean(axis=1, keepdims=True) + k.mean()


def linear_cka(codes_a, codes_b) -> float:
    """Linear CKA of codes [tokens, n_a] and [tokens, n_b] (dense arrays / tensors or scipy sparse; the same tokens
    in the same order): ‖Ycᵀ Xc‖²_F / (‖Xcᵀ Xc‖_F ‖Ycᵀ Yc‖_F) with each feature centred over the tokens. 1 for
    codes that are an orthogonal transform and scaling of each other, ~0 for unrelated ones. Computed in feature
    space or, when that is bigger, through the centred token Gram matrices (the same number, Kornblith et al. eq. 5).
    (The ITDA reference code also divides each feature by its norm first; that is not the standard CKA.)"""
    x, y = _as_matrix(codes_a, "A"), _as_matrix(codes_b, "B")
    if x.shape[0] != y.shape[0]:
        raise ConfigError(f"linear_cka: A has codes for {x.shape[0]} tokens, B for {y.shape[0]} "
                          "(they must cover the same tokens)")
    t, na, nb = x.shape[0], x.shape[1], y.shape[1]
    if na * nb + na * na + nb * nb <= 3 * t * t:
        num = np.square(_centred_cross(x, y)).sum()
        den = np.sqrt(np.square(_centred_cross(x, x)).sum() * np.square(_centred_cross(y, y)).sum())
    else:
        kx, ky = _centred_gram(x), _centred_gram(y)
        num = (kx * ky).sum()
        den = np.sqrt((kx * kx).sum() * (ky * ky).sum())
    if not den > 0:
        raise ConfigError("linear_cka: the codes of one side do not vary over the tokens (CKA undefined)")
    return float(num / den)


__all__ = ["itda_jaccard", "itda_overlap", "linear_cka"]
