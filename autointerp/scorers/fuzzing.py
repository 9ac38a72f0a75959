"""Fuzzing scorer: does the explanation tell where in a window the latent fires?

As in delphi, only activating test windows are used (50, stratified over deciles), as display windows
(`SamplingConfig.display_ctx` tokens around each window's peak, see autointerp.sampling). Half of each decile shows
the true highlights (tokens of the displayed window above `threshold` × the window's own max activation, so every
window has at least one: the peak is always displayed); the other half shows as many highlights on random silent
tokens of the displayed window. The judge says which highlights fit the explanation. Batches of 25 → 2 calls for
50 examples (see detection.py for the call budget).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from ..formatting import highlight_mask
from ..llm.base import LLMClient
from ..prompt_files import load_prompt
from ..records import LatentRecord
from ..sampling import NegativePool, SamplingConfig, Skipped, rng_for, sample_latent
from ._classify import PROMPT_VARS, Item, classify, outcome_metrics
from .base import ScoreResult
from .base import explanation_parts
from .detection import skipped_result

NAME = "fuzzing"


@dataclass(frozen=True)
class FuzzingConfig:
    sampling: SamplingConfig = SamplingConfig()
    batch_size: int = 25  # 50 examples in 2 calls (see detection.py, "Call budget")
    threshold: float = 0.3  # of each window's own max activation
    temperature: float = 0.0
    max_tokens: int | None = None
    prompt: str = "fuzzing"
    prompt_dir: Path | None = None
    pool: NegativePool | None = field(default=None, compare=False)


Config = FuzzingConfig


def preflight(config: FuzzingConfig, client: LLMClient | None) -> list:
    if client is None:
        raise ConfigError("fuzzing scorer needs a judge LLM client")
    return [load_prompt(config.prompt, PROMPT_VARS, config.prompt_dir)]


def wrong_mask(acts: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray | None:
    """k highlights on silent tokens (act == 0); None when the window has fewer than k silent tokens."""
    silent = np.flatnonzero(np.asarray(acts) <= 0)
    if len(silent) < k:
        return None
    mask = np.zeros(len(acts), bool)
    mask[rng.choice(silent, size=k, replace=False)] = True
    return mask


async def score(
    record: LatentRecord,
    explanation,
    client: LLMClient | None,
    *,
    config: FuzzingConfig = FuzzingConfig(),
    seed: int = 0,
) -> ScoreResult:
    if isinstance(explanation, Skipped):
        return skipped_result(NAME, record, explanation, seed)
    text, used = explanation_parts(explanation)
    sample = sample_latent(record, config.sampling, seed, pool=config.pool, exclude_ids=used,
                           explain_negatives=False)
    if isinstance(sample, Skipped):
        return skipped_result(NAME, record, sample, seed)
    rng = rng_for(seed, record.latent, NAME)
    test, quant = sample.shown("test"), sample.test_quantile
    # alternate correct/wrong along the deciles (shuffled inside each): half/half overall and in every decile
    # up to one; a coin decides which label an odd-sized decile favours
    order = np.concatenate([rng.permutation(np.flatnonzero(quant == q)) for q in np.unique(quant)])
    correct = np.zeros(len(test), bool)
    correct[order[::2]] = True
    if rng.random() < 0.5:
        correct[order] = ~correct[order]
    items, n_unfuzzable = [], 0
    for t, a, q, w, c in zip(test.tokens, test.acts, quant, test.window_ids, correct):
        true_mask = highlight_mask(a, config.threshold * float(a.max()))
        mask = true_mask if c else wrong_mask(a, int(true_mask.sum()), rng)
        if mask is None:  # a window that fires almost everywhere cannot be mis-highlighted
            n_unfuzzable += 1
            continue
        items.append(Item(record.prompt_text(t, mask), int(c), int(q), int(w),
                          "correct" if c else "wrong"))
    if not items:
        return ScoreResult(NAME, record.latent, {}, seed=seed, skipped="no window could be fuzzed")
    out = await classify(items, text, client, prompt=config.prompt, prompt_dir=config.prompt_dir,
                         batch_size=config.batch_size, rng=rng, temperature=config.temperature,
                         max_tokens=config.max_tokens, seed=seed)
    metrics, details = outcome_metrics(items, out, sample.n_quantiles)
    details["n_unfuzzable"] = n_unfuzzable
    return ScoreResult(NAME, record.latent, metrics, details, out.usage, out.prompt_version, out.model, seed)
