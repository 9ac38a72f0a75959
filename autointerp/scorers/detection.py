"""Detection scorer: from the explanation alone, can a judge tell activating windows from silent ones?

Test set: 50 activating windows stratified over activation deciles + 50 negatives (half of them "hard": the pool
windows most similar to the activating ones, when a NegativePool is given), shown without highlights as display
windows (`SamplingConfig.display_ctx` tokens: activating ones around their peak, see autointerp.sampling),
shuffled and batched.

Call budget. Explain (1) + detection + fuzzing: at most 6 calls per latent at 50+50 test examples (issue 10).
Detection judges 100 examples, fuzzing 50 (fewer when a window cannot be fuzzed): batches of 34 and 25 give 3 + 2
calls, 6 in all (batches of 20 gave 5 + 3 = 9; 10 gave 16: bench/llm_calls.py). The larger batch costs the judge
no longer prompt than before: 34 windows of 32 display tokens are fewer tokens (~1.1k) than the 20 windows of 64
that a call held before, and the answer is a 34-digit list (which the local backend decodes under a 0/1-list
grammar). Whether a given judge loses accuracy at 34 vs 20 examples per call is an empirical question per model
(`batch_size` is a config field; it is part of the score's identity). Batches are of near-equal size (34/33/33,
never a stub of 2), and each batch mixes activating and negative examples after a seeded shuffle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from ..llm.base import LLMClient
from ..prompt_files import load_prompt
from ..records import LatentRecord
from ..sampling import NegativePool, SamplingConfig, Skipped, rng_for, sample_latent
from ._classify import PROMPT_VARS, Item, classify, outcome_metrics
from .base import ScoreResult, explanation_parts

NAME = "detection"


@dataclass(frozen=True)
class DetectionConfig:
    sampling: SamplingConfig = SamplingConfig()
    batch_size: int = 34  # 100 examples in 3 calls (see "Call budget")
    temperature: float = 0.0
    max_tokens: int | None = None  # default: enough for the answer list
    prompt: str = "detection"
    prompt_dir: Path | None = None
    pool: NegativePool | None = field(default=None, compare=False)


Config = DetectionConfig


def preflight(config: DetectionConfig, client: LLMClient | None) -> list:
    if client is None:
        raise ConfigError("detection scorer needs a judge LLM client")
    return [load_prompt(config.prompt, PROMPT_VARS, config.prompt_dir)]


def skipped_result(name: str, record: LatentRecord, s: Skipped, seed: int) -> ScoreResult:
    return ScoreResult(name, record.latent, {}, seed=seed, skipped=s.reason)


async def score(
    record: LatentRecord,
    explanation,
    client: LLMClient | None,
    *,
    config: DetectionConfig = DetectionConfig(),
    seed: int = 0,
) -> ScoreResult:
    if isinstance(explanation, Skipped):
        return skipped_result(NAME, record, explanation, seed)
    text, used = explanation_parts(explanation)
    sample = sample_latent(record, config.sampling, seed, pool=config.pool, exclude_ids=used,
                           explain_negatives=False)
    if isinstance(sample, Skipped):
        return skipped_result(NAME, record, sample, seed)
    test, neg = sample.shown("test"), sample.shown("negatives")
    items = [Item(record.prompt_text(t), 1, int(q), int(w))
             for t, q, w in zip(test.tokens, sample.test_quantile, test.window_ids)]
    items += [Item(record.prompt_text(t), 0, -1, int(w), "hard" if h else "random")
              for t, w, h in zip(neg.tokens, neg.window_ids, sample.negative_is_hard)]
    out = await classify(items, text, client, prompt=config.prompt, prompt_dir=config.prompt_dir,
                         batch_size=config.batch_size, rng=rng_for(seed, record.latent, NAME),
                         temperature=config.temperature, max_tokens=config.max_tokens, seed=seed)
    metrics, details = outcome_metrics(items, out, sample.n_quantiles)
    hard = [k for k, it in enumerate(items) if it.tag == "hard" and out.pred[k] >= 0]
    metrics["accuracy_hard_negatives"] = float(np.mean([out.pred[k] == 0 for k in hard])) if hard else None
    details["n_hard_negatives"] = int(sample.negative_is_hard.sum())
    return ScoreResult(NAME, record.latent, metrics, details, out.usage, out.prompt_version, out.model, seed)
