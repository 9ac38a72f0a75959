"""Build ITDA dictionaries from a subject model's activations, the greedy way of Leask et al. (2025), and save them in
the public layout (`atoms.pt`, `atom_indices.pt`, `metadata.yaml`; read back by `autointerp.dictionaries`).

The rule follows `ITDATrainer.update` of the reference code (github.com/davidkaczer/itda, train.py): activations
stream in batches of sequences; each token is reconstructed by k steps of matching pursuit over the atoms so far;
its error is the mean over dimensions of (x/|x| - r/|r|)² (norms clamped at 1e-9, so with no atoms yet, or a zero
reconstruction, it is 1/d_model); every token of the batch above `threshold` joins as an atom, normalised, in
token order, and the dictionary is cut to its first `max_atoms`. An atom's index is (sequence, token): the window's
number in the corpus stream and the position in it (the BOS at 0 included, as the reference keeps every position).

One deliberate difference: while it holds fewer than d_model atoms, the reference first fills the dictionary with the
batch's most frequent distinct activations (in the order of a sort by count, ties by value). At this scale
(max_atoms < d_model) that step alone would fill it from the first batch, with no threshold ever applied, so it is
left out: only the threshold rule adds atoms.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .corpus import CorpusSpec, iter_windows
from .dictionaries.itda import ATOMS, INDICES, METADATA, matching_pursuit
from .errors import ConfigError

FORWARD_WINDOWS = 16  # windows per forward pass of the subject model
DEFAULT_THRESHOLD = 1e-3  # on the mean-over-dimensions error: (2 - 2 cos) / d_model, see normalised_error


def normalised_error(x: Tensor, recon: Tensor, eps: float = 1e-9) -> Tensor:
    """[t] mean over dimensions of (x/|x| - r/|r|)², as the reference trainer measures it."""
    xn = x / x.norm(dim=-1, keepdim=True).clamp_min(eps)
    rn = recon / recon.norm(dim=-1, keepdim=True).clamp_min(eps)
    return (xn - rn).pow(2).mean(dim=-1)


class ItdaBuilder:
    """One layer's dictionary as it grows: `update` with each batch of activations [B, S, d], in stream order."""

    def __init__(self, d: int, k: int, threshold: float, max_atoms: int):
        if k < 1 or max_atoms < 1:
            raise ConfigError(f"itda build: k and max_atoms must be >= 1 (got k={k}, max_atoms={max_atoms})")
        if not threshold >= 0:
            raise ConfigError(f"itda build: threshold must be >= 0 (got {threshold})")
        self.d, self.k, self.threshold, self.max_atoms = d, k, float(threshold), max_atoms
        self.atoms = torch.empty(0, d)
        self.indices = torch.empty(0, 2, dtype=torch.int64)
        self.steps = 0

    @property
    def full(self) -> bool:
        return len(self.atoms) >= self.max_atoms

    @torch.no_grad()
    def update(self, x: Tensor, first_sequence: int) -> float:
        """Add the tokens of x [B, S, d] (sequences first_sequence, first_sequence + 1, ...) that the current atoms
        reconstruct worse than the threshold; returns the batch's mean error (0 once full)."""
        if self.full:
            return 0.0
        b, s, d = x.shape
        flat = x.reshape(-1, d).float().cpu()
        recon = matching_pursuit(self.atoms, flat, self.k)[0] @ self.atoms if len(self.atoms) \
            else torch.zeros_like(flat)
        err = normalised_error(flat, recon)
        add = torch.nonzero(err > self.threshold, as_tuple=True)[0][: self.max_atoms - len(self.atoms)]
        if len(add):
            new = flat[add] / flat[add].norm(dim=1, keepdim=True).clamp_min(1e-9)
            where = torch.stack([first_sequence + add // s, add % s], dim=1)
            self.atoms = torch.cat([self.atoms, new])
            self.indices = torch.cat([self.indices, where])
        self.steps += 1
        return float(err.mean())


def save_itda(folder: str | Path, atoms: Tensor, atom_indices: Tensor, metadata: dict) -> Path:
    """Write the public layout: atoms.pt [n, d] float, atom_indices.pt [n, 2] int64, metadata.yaml."""
    import yaml

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(atoms.detach().cpu().contiguous(), folder / ATOMS)
    torch.save(atom_indices.detach().cpu().to(torch.int64).contiguous(), folder / INDICES)
    (folder / METADATA).write_text(yaml.safe_dump(metadata, sort_keys=True), encoding="utf-8")
    return folder


def build_itda(subject, layers: list[int], corpus: CorpusSpec, out: str | Path, *, k: int = 8,
               threshold: float = DEFAULT_THRESHOLD, max_atoms: int = 512, batch_size: int = 1,
               folder_name: str = "layer_{layer}") -> dict[int, Path]:
    """ITDA dictionaries at resid_post of each of `layers`, all from the same token windows of `corpus` (one forward
    pass serves every layer, so atom indices are comparable across layers); saved under out/<folder_name>. Returns
    {layer: folder}. Stops reading the corpus once every dictionary is full.

    `batch_size`: sequences per greedy step. Every token of a step is judged against the atoms from earlier steps
    only, so the whole first step joins (nothing reconstructs it yet) and is shared by every layer; with a few
    thousand tokens that would drown the layer differences at the reference's batch sizes, hence 1 by default.
    `threshold` is on the reference's error, (2 - 2 cos(x, recon)) / d_model: 1e-3 at d_model 576 adds tokens whose
    reconstruction has cosine < 0.71."""
    layers = sorted(set(int(x) for x in layers))
    if not layers:
        raise ConfigError("itda build: no layers given")
    hooks = {layer: subject.hookpoint(f"resid_post.{layer}") for layer in layers}  # raises on a bad layer
    builders = {layer: ItdaBuilder(subject.width(f"resid_post.{layer}"), k, threshold, max_atoms) for layer in layers}
    if batch_size < 1:
        raise ConfigError(f"itda build: batch_size must be >= 1 (got {batch_size})")
    # the model runs on several update batches at once (one-sequence forwards are slow); the rule sees the same
    # batches either way
    per_forward = batch_size * max(1, FORWARD_WINDOWS // batch_size)
    seq = 0
    for windows in iter_windows(corpus, subject.tokenizer, per_forward):
        acts = subject.capture(torch.from_numpy(np.asarray(windows)).long(), list(hooks.values()))
        for w0 in range(0, len(windows), batch_size):
            for layer, bld in builders.items():
                bld.update(acts[hooks[layer].name][w0:w0 + batch_size], seq)
            seq += len(windows[w0:w0 + batch_size])
            if all(b.full for b in builders.values()):
                break
        if all(b.full for b in builders.values()):
            break
    paths = {}
    for layer, bld in builders.items():
        # the reference trainer's field names (lm_name, layer, dataset, seq_len, k, loss_threshold, ...), plus ours
        meta = {
            "lm_name": subject.name, "layer": layer, "submodule_name": None, "dataset": corpus.source,
            "seq_len": corpus.ctx_len, "k": k, "loss_threshold": float(threshold), "batch_size": batch_size,
            "steps": bld.steps, "activation_dim": bld.d, "max_dict_size": max_atoms, "seed": corpus.seed,
            "n_tokens": seq * corpus.ctx_len, "bos": corpus.bos, "built_by": "autointerp.itda_build",
        }
        paths[layer] = save_itda(Path(out) / folder_name.format(layer=layer), bld.atoms, bld.indices, meta)
    return paths


__all__ = ["DEFAULT_THRESHOLD", "ItdaBuilder", "build_itda", "normalised_error", "save_itda"]
