"""Synthetic LatentRecords with known ground truth, for sampler/explainer/scorer tests and the benchmark.

A world of word tokens: filler words plus, for each latent i, a trigger set T_i (disjoint across latents).
Latent i fires exactly on the tokens of T_i, with activation = word strength × window intensity (intensity
uniform in (0.05, 1], so every activation decile is populated). Each latent has its own activating windows (1-3
trigger tokens each); the shared pool holds filler windows, some with one trigger of a random latent, so a
latent's negatives (pool windows without its triggers) contain other latents' triggers as often as its
activating windows do: a wrong rule then predicts the same thing for both classes.

`oracle_explanation(i)` = "fires on the words: a, b, c" — the format tests/judges.py applies as a rule.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from autointerp.records import Examples, LatentRecord, LatentStats

FILLER = (
    "the a of and to in is was for on with as by at from that this it he she they we you be have had not but "
    "or an are were his her their its our my all some more many most other such only also very just then now "
    "here there when where how what which who time year way day man world life hand part place case week "
    "point number group problem fact house water room mother area money story month night study book eye job "
    "word side kind head far black long little own great old big high different small large next early young "
    "important few public bad same able last late hard major better economic strong possible whole free"
).split()
NAMED_TRIGGERS = (
    ("cat", "dog", "horse"),
    ("red", "blue", "green"),
    ("Paris", "London", "Tokyo"),
    ("run", "jump", "swim"),
    ("one", "two", "three"),
    ("piano", "violin", "drum"),
    ("apple", "banana", "cherry"),
    ("Monday", "Friday", "Sunday"),
)


def trigger_set(i: int) -> tuple[str, ...]:
    if i < len(NAMED_TRIGGERS):
        return NAMED_TRIGGERS[i]
    return tuple(f"zq{i}{c}" for c in "abc")  # made-up words, still one token each


def oracle_explanation(i: int) -> str:
    return "fires on the words: " + ", ".join(trigger_set(i))


@dataclass
class World:
    vocab: list[str]
    n_latents: int
    ctx: int
    windows: np.ndarray  # [n_windows, ctx] token ids; window id = row
    pool_ids: np.ndarray  # ids of the shared pool windows
    act_ids: list[np.ndarray]  # per latent: ids of its own activating windows
    strength: np.ndarray  # [vocab] activation strength of a trigger word (0 for filler)
    intensity: np.ndarray  # [n_windows]
    owner: np.ndarray  # [vocab] latent index a word triggers, -1 for filler
    n_top: int = 40
    n_sample: int = 100
    seed: int = 0
    _rng: np.random.Generator = field(default=None, repr=False)

    def decode(self, ids) -> list[str]:
        return [" " + self.vocab[int(t)] for t in ids]

    def acts(self, latent: int, ids: np.ndarray) -> np.ndarray:
        toks = self.windows[ids]
        fire = self.owner[toks] == latent
        return np.where(fire, self.strength[toks] * self.intensity[ids][:, None], 0.0).astype(np.float32)

    def examples(self, latent: int, ids) -> Examples:
        ids = np.asarray(ids, np.int64)
        return Examples(ids, self.windows[ids].astype(np.int32), self.acts(latent, ids))

    def record(self, latent: int, n_activating: int | None = None) -> LatentRecord:
        """The record the cache would return; `n_activating` caps the activating windows (skip tests)."""
        pool_acts = self.acts(latent, self.pool_ids)
        pool_fire = pool_acts.max(axis=1) > 0
        act = np.concatenate([self.act_ids[latent], self.pool_ids[pool_fire]])
        if n_activating is not None:
            act = act[:n_activating]
        ex = self.examples(latent, act)
        order = np.lexsort((ex.window_ids, -ex.max_acts))
        top = ex.take(order[: self.n_top])
        rng = np.random.default_rng([self.seed, latent, 7])
        sample = ex.take(np.sort(rng.choice(len(ex), size=min(self.n_sample, len(ex)), replace=False)))
        negatives = self.examples(latent, self.pool_ids[~pool_fire])
        firing = ex.acts[ex.acts > 0]
        edges = np.linspace(0, float(firing.max()), 11)
        stats = LatentStats(
            n_tokens=int(self.windows.size), n_active=int(firing.size), max_act=float(firing.max()),
            mean_act=float(firing.mean()), hist_edges=edges, hist_counts=np.histogram(firing, edges)[0],
        )
        return LatentRecord(latent, top, sample, negatives, stats, dictionary_id="synthetic", decode=self.decode)


def make_world(n_latents: int = 8, ctx: int = 16, n_act: int = 150, n_pool: int = 400, p_other: float = 0.3,
               seed: int = 0) -> World:
    rng = np.random.default_rng(seed)
    vocab = list(FILLER)
    owner = [-1] * len(vocab)
    for i in range(n_latents):
        for w in trigger_set(i):
            vocab.append(w)
            owner.append(i)
    owner = np.asarray(owner)
    strength = np.where(owner >= 0, rng.uniform(0.6, 1.0, len(vocab)), 0.0)
    n_filler = len(FILLER)
    trig_ids = [np.flatnonzero(owner == i) for i in range(n_latents)]

    def window(latent: int | None) -> np.ndarray:
        w = rng.integers(n_filler, size=ctx)
        if latent is not None:
            pos = rng.choice(ctx, size=int(rng.integers(1, 4)), replace=False)
            w[pos] = rng.choice(trig_ids[latent], size=len(pos))
        if rng.random() < p_other and n_latents > 1:  # a trigger of some other latent, as in the pool
            other = int(rng.integers(n_latents))
            if other != latent:
                free = np.flatnonzero(w < n_filler)
                w[rng.choice(free)] = rng.choice(trig_ids[other])
        return w

    rows = [window(None) for _ in range(n_pool)]
    act_ids = []
    for i in range(n_latents):
        start = len(rows)
        rows += [window(i) for _ in range(n_act)]
        act_ids.append(np.arange(start, len(rows)))
    windows = np.stack(rows).astype(np.int32)
    intensity = rng.uniform(0.05, 1.0, len(rows))
    return World(vocab, n_latents, ctx, windows, np.arange(n_pool), act_ids, strength, intensity, owner,
                 seed=seed)


def bag_of_words_embed(texts: list[str], dim: int = 256) -> np.ndarray:
    """A cheap deterministic stand-in for the sentence embedder (hashed bag of words, unit norm)."""
    import zlib

    out = np.zeros((len(texts), dim), np.float32)
    for r, t in enumerate(texts):
        for w in t.split():
            out[r, zlib.crc32(w.encode()) % dim] += 1.0
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.maximum(norms, 1e-9)


class CountingEmbed:
    """bag_of_words_embed that records every text it was asked to embed."""

    def __init__(self):
        self.texts = []

    def __call__(self, texts):
        self.texts += list(texts)
        return bag_of_words_embed(texts)
