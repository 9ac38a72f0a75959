"""The per-latent record that sampling, explainers and scorers consume.

A LatentRecord is what `LatentCache.record(i)` returns: everything known about one latent, with the token
windows already resolved (windows are stored once in the cache and referenced by id).
Activations are per token, for this latent only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .formatting import escape_token, render_tokens


@dataclass
class Examples:
    """A set of token windows with this latent's per-token activations.

    window_ids: [n] int64 ids of the windows in the cache (stable across reads; used to keep sets disjoint).
    tokens:     [n, ctx] int32 token ids.
    acts:       [n, ctx] float32 activations of this latent at each token (0 where it does not fire).
    """

    window_ids: np.ndarray
    tokens: np.ndarray
    acts: np.ndarray

    def __len__(self) -> int:
        return int(self.window_ids.shape[0])

    @property
    def max_acts(self) -> np.ndarray:
        return self.acts.max(axis=1) if len(self) else np.zeros(0, dtype=np.float32)

    def take(self, idx) -> "Examples":
        idx = np.asarray(idx, dtype=np.int64)
        return Examples(self.window_ids[idx], self.tokens[idx], self.acts[idx])

    @staticmethod
    def empty(ctx_len: int) -> "Examples":
        return Examples(
            np.zeros(0, np.int64), np.zeros((0, ctx_len), np.int32), np.zeros((0, ctx_len), np.float32)
        )

    @staticmethod
    def concat(parts: list["Examples"]) -> "Examples":
        parts = [p for p in parts if len(p)]
        if not parts:
            raise ValueError("concat of no examples")
        return Examples(
            np.concatenate([p.window_ids for p in parts]),
            np.concatenate([p.tokens for p in parts]),
            np.concatenate([p.acts for p in parts]),
        )


@dataclass
class LatentStats:
    n_tokens: int  # tokens seen in the whole run
    n_active: int  # tokens where the latent fired (> 0)
    max_act: float
    mean_act: float  # mean over the tokens where it fired
    hist_edges: np.ndarray  # [n_bins + 1] activation bin edges
    hist_counts: np.ndarray  # [n_bins] counts of firing tokens per bin

    @property
    def frequency(self) -> float:
        return self.n_active / self.n_tokens if self.n_tokens else 0.0


@dataclass
class LatentRecord:
    """Everything the cache knows about one latent.

    top:       the top-K activating windows, sorted by max activation (desc), ties by window id (asc).
    sample:    a uniform random sample of activating windows (the strata for quantile sampling).
    negatives: windows from the shared random pool where this latent does not fire at all.
    decode:    turns token ids into strings (one string per token) for prompts; set by the cache reader.
    """

    latent: int
    top: Examples
    sample: Examples
    negatives: Examples
    stats: LatentStats
    dictionary_id: str = ""
    decode: object = field(default=None, repr=False)  # Callable[[Sequence[int]], list[str]]

    @property
    def ctx_len(self) -> int:
        return int(self.top.tokens.shape[1])

    def token_strings(self, tokens) -> list[str]:
        """Per-token strings of one window (what a prompt shows)."""
        if self.decode is None:
            return [str(int(t)) for t in tokens]
        return list(self.decode(tokens.tolist() if hasattr(tokens, "tolist") else [int(t) for t in tokens]))

    def prompt_text(self, tokens, mask=None) -> str:
        """One window as a prompt shows it (formatting.render_tokens, runs under `mask` highlighted). A
        TokenDecoder escapes each token id's string once (`escaped`), not once per window: ~150 windows per
        latent."""
        escaped = getattr(self.decode, "escaped", None)
        if escaped is not None:
            strs = escaped(tokens)
        else:
            strs = [escape_token(s) for s in self.token_strings(tokens)]
        return render_tokens(strs, mask, escaped=True)
