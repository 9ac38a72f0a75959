"""ITDA (Leask et al. 2025, "Inference-Time Decomposition of Activations"): a dictionary of real activations.

A folder holds `atoms.pt` (a torch tensor [n_atoms, d_model], unit rows: each an activation seen in the prompt set,
normalised), `atom_indices.pt` ([n_atoms, 2] int64: (sequence, token) in the prompt set where each atom came from) and
`metadata.yaml` (k, lm_name, layer, dataset, seq_len, loss_threshold, ...).

Encoding follows `mp_encode` / `ITDA.encode` of the reference code (github.com/davidkaczer/itda, train.py): the
activation is cast to the atoms' dtype and used as it is — no normalisation, no mean or bias subtraction — then k
steps of matching pursuit: correlations c = residual · atomsᵀ, pick j = argmax |c_j|, add c_j (signed) to atom j's
code (an atom picked twice gets the sum), residual -= c_j · atom_j. Decoding is codes @ atoms (no bias). `k` defaults
to 40 when metadata.yaml omits it, as the reference `from_pretrained` does. The reference's `layer` is the output of
decoder block `layer` (TransformerLens `blocks.{layer}.hook_resid_post`, or a hook on `model.layers[layer]`), so the
hookpoint is `resid_post.{layer}`.

Codes are signed: the extraction collects them as 2n units (see `Poles`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from autointerp.errors import ConfigError

from ._files import cfg_int, one_line
from .base import ENCODE_CHUNK_BYTES, Dictionary

ATOMS, INDICES, METADATA = "atoms.pt", "atom_indices.pt", "metadata.yaml"
DEFAULT_K = 40  # the reference from_pretrained's default when metadata.yaml has no k
# Rows of atoms.pt must be unit vectors (the reference renormalises after every addition). bf16 copies are off by
# ~1e-3; an all-zero activation stays a zero row (the reference clamps the norm), which matching pursuit never picks.
_UNIT_TOL = 1e-2


@torch.no_grad()
def matching_pursuit(atoms: Tensor, x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """k steps of matching pursuit of x [t, d] over unit atoms [n, d]: (codes [t, n] float32, residual [t, d]).
    The correlations and the residual are in the atoms' dtype (as the reference computes them)."""
    rows = torch.arange(x.shape[0], device=x.device)
    residual = x.to(atoms.dtype).clone()
    codes = torch.zeros(x.shape[0], atoms.shape[0], device=x.device, dtype=torch.float32)
    for _ in range(k):
        corr = residual @ atoms.T
        best = corr.abs().argmax(dim=1)
        coef = corr[rows, best]
        codes.index_put_((rows, best), coef.float(), accumulate=True)  # a re-picked atom's coefficients add
        residual -= coef[:, None] * atoms[best]
    return codes, residual


class ItdaDictionary(Dictionary):
    """ITDA atoms as a signed dictionary: encode = k steps of matching pursuit, decoder rows = the atoms."""

    format = "itda"
    signed = True

    def __init__(self, atoms: Tensor, atom_indices: Tensor, k: int, *, source: str, id: str,
                 hookpoint: str | None, cfg: dict[str, Any] | None = None):
        self.source, self.id, self.hookpoint, self.transcoder = source, id, hookpoint, False
        self.atoms = atoms
        self.atom_indices = atom_indices  # [n, 2] int64 on the CPU: what whole-dictionary similarity compares
        self.k = int(k)
        self.n_latents, self.d_in = int(atoms.shape[0]), int(atoms.shape[1])
        self.d_out = self.d_in
        self.cfg = cfg or {}

    @property
    def dtype(self) -> torch.dtype:
        return self.atoms.dtype

    @property
    def device(self) -> torch.device:
        return self.atoms.device

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "ItdaDictionary":
        self.atoms = self.atoms.to(device=device or self.atoms.device, dtype=dtype or self.atoms.dtype)
        return self

    def _rows(self) -> int:
        # three [rows, n] buffers live per step (correlations, their abs, the codes)
        return max(1, ENCODE_CHUNK_BYTES // (3 * 4 * self.n_latents))

    def _chunks(self, x: Tensor) -> Iterator[Tensor]:
        """Dense codes [rows, n] of x's tokens, ENCODE_CHUNK_BYTES worth of tokens at a time (tokens are
        independent)."""
        self._check_input(x)
        flat = x.reshape(-1, self.d_in).to(self.device)
        if not flat.shape[0]:
            yield torch.zeros(0, self.n_latents, device=self.device)
        for chunk in flat.split(self._rows()):
            yield matching_pursuit(self.atoms, chunk, self.k)[0]

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        return torch.cat(list(self._chunks(x))).view(*x.shape[:-1], self.n_latents)

    @torch.no_grad()
    def encode_topk(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(values, indices) [..., k'] with k' = min(k, n): the distinct atoms matching pursuit picked (a re-picked
        atom appears once, with its summed coefficient), padded with zero values at other atoms."""
        kk = min(self.k, self.n_latents)
        vals, idx = [], []
        for codes in self._chunks(x):  # never the whole batch's dense codes at once
            i = codes.abs().topk(kk, dim=-1, sorted=False).indices
            vals.append(codes.gather(-1, i))
            idx.append(i)
        shape = (*x.shape[:-1], kk)
        return torch.cat(vals).view(shape), torch.cat(idx).view(shape)

    @torch.no_grad()
    def nonzero_chunks(self, x: Tensor) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        codes = self.encode(x).reshape(-1, self.n_latents)
        tok, lat = torch.nonzero(codes != 0, as_tuple=True)  # signed: negative codes are codes too
        yield tok, lat, codes[tok, lat]

    def nnz_bound(self) -> int:
        return min(self.k, self.n_latents)

    def encode_bytes(self, tokens: int) -> tuple[int, int]:
        return 3 * min(tokens * self.n_latents * 4, ENCODE_CHUNK_BYTES) + tokens * self.k * 12, self.n_latents

    def decoder_directions(self) -> Tensor:
        return self.atoms

    @torch.no_grad()
    def decode(self, codes: Tensor) -> Tensor:
        return codes.to(device=self.device, dtype=self.dtype) @ self.atoms


def _load_tensor(path: Path) -> Tensor:
    if not path.is_file():
        raise ConfigError(f"{path}: file not found (an ITDA folder holds {ATOMS}, {INDICES} and {METADATA})")
    try:
        t = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and torch errors alike: a bad file
        raise ConfigError(f"{path}: cannot read torch file, corrupt or not a tensor? ({one_line(e)})") from e
    if not isinstance(t, Tensor):
        raise ConfigError(f"{path}: expected one tensor, got {type(t).__name__}")
    return t


def read_metadata(path: Path) -> dict[str, Any]:
    import yaml  # PyYAML comes with transformers / huggingface_hub

    if not path.is_file():
        raise ConfigError(f"{path}: file not found (an ITDA folder holds {ATOMS}, {INDICES} and {METADATA})")
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: not valid YAML ({one_line(e)})") from e
    if cfg is None:
        cfg = {}
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: expected a YAML mapping, got {type(cfg).__name__}")
    return cfg


def _check_indices(idx: Tensor, folder: Path, atoms_shape: tuple[int, ...] | None) -> Tensor:
    """atom_indices as [n, 2] int64, checked against the atoms' shape when given; one-line errors naming both."""
    n_ok = atoms_shape is None or idx.ndim == 2 and idx.shape[0] == atoms_shape[0]
    if idx.ndim != 2 or idx.shape[1] != 2 or not n_ok:
        have = "" if atoms_shape is None else f" and {ATOMS} has shape {tuple(atoms_shape)}"
        want = "[n_atoms, 2]" if atoms_shape is None else "[n_atoms, d_model] and [n_atoms, 2]"
        hint = " (atoms transposed?)" if atoms_shape is not None and idx.ndim == 2 and idx.shape[1] == 2 \
            and idx.shape[0] == atoms_shape[1] else ""
        raise ConfigError(f"{folder}: {INDICES} has shape {tuple(idx.shape)}{have}; expected {want}{hint}")
    if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
        raise ConfigError(f"{folder / INDICES}: atom_indices has dtype {idx.dtype}, expected integers "
                          "(sequence, token)")
    return idx.to(torch.int64)


def read_atom_indices(folder: Path) -> Tensor:
    """atom_indices.pt of an ITDA folder as [n, 2] int64 (sequence, token): all whole-dictionary similarity needs."""
    return _check_indices(_load_tensor(Path(folder) / INDICES), Path(folder), None)


def load_itda(folder: Path, *, source: str, id: str, hookpoint: str | None, device: str | torch.device,
              dtype: torch.dtype) -> ItdaDictionary:
    folder = Path(folder)
    cfg = read_metadata(folder / METADATA)
    atoms = _load_tensor(folder / ATOMS)
    idx = _load_tensor(folder / INDICES)
    apath, mpath = folder / ATOMS, folder / METADATA
    if atoms.ndim != 2 or not atoms.dtype.is_floating_point:
        raise ConfigError(f"{apath}: atoms has shape {tuple(atoms.shape)} dtype {atoms.dtype} ({INDICES}: "
                          f"{tuple(idx.shape)}), expected a float tensor [n_atoms, d_model]")
    idx = _check_indices(idx, folder, tuple(atoms.shape))
    if atoms.shape[0] == 0:
        raise ConfigError(f"{apath}: holds no atoms (shape {tuple(atoms.shape)})")
    if not torch.isfinite(atoms).all():
        raise ConfigError(f"{apath}: atoms hold NaN or infinite values")
    norms = atoms.float().norm(dim=1)
    bad = ~((norms - 1).abs() <= _UNIT_TOL) & ~(norms < 1e-6)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ConfigError(f"{apath}: atoms must be unit rows [n_atoms, d_model]; row {i} has norm "
                          f"{float(norms[i]):.4g} (shape {tuple(atoms.shape)}; transposed?)")
    k = cfg_int(cfg, "k", mpath, default=DEFAULT_K)
    if hookpoint is None and cfg.get("layer") is not None:
        hookpoint = f"resid_post.{cfg_int(cfg, 'layer', mpath, minimum=0)}"
    return ItdaDictionary(atoms.to(device=device, dtype=dtype), idx, k, source=source, id=id, hookpoint=hookpoint,
                          cfg=cfg)


__all__ = ["ItdaDictionary", "load_itda", "matching_pursuit", "read_atom_indices", "read_metadata"]
