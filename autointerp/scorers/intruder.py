"""Intruder scorer: no explanation involved. Does the latent's set of windows hang together?

Each trial shows `n_examples` activating test windows of the latent plus one intruder (a pool window where the
latent is silent, half of them embedding-similar "hard" ones when a NegativePool is given) at a random position;
the judge names the intruder. Score: accuracy over trials (chance = 1/(n_examples+1)); unparseable answers count in
n_failed, not as wrong. Trials run concurrently, one call each.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ..aio import gather_or_cancel
from ..errors import ConfigError
from ..formatting import highlight_mask, numbered
from ..llm.base import LLMClient, SamplingParams, Usage
from ..prompt_files import load_prompt
from ..records import LatentRecord
from ..sampling import NegativePool, SamplingConfig, Skipped, rng_for, sample_latent
from .base import ScoreResult
from .base import explanation_parts
from .detection import skipped_result

NAME = "intruder"
_ANSWER = re.compile(r"\[\s*ANSWER\s*\]\s*:?\s*\**\s*(?:example\s*)?#?(\d+)", re.I)


@dataclass(frozen=True)
class IntruderConfig:
    sampling: SamplingConfig = SamplingConfig()
    n_trials: int = 5
    n_examples: int = 4  # latent windows per trial (+1 intruder)
    highlight: bool = False  # mark activating tokens (the intruder then shows none: an easy giveaway)
    threshold: float = 0.3
    temperature: float = 0.0
    max_tokens: int = 300
    prompt: str = "intruder"
    prompt_dir: Path | None = None
    pool: NegativePool | None = field(default=None, compare=False)


Config = IntruderConfig
_VARS = {"examples"}


def preflight(config: IntruderConfig, client: LLMClient | None) -> list:
    if client is None:
        raise ConfigError("intruder scorer needs a judge LLM client")
    return [load_prompt(config.prompt, _VARS, config.prompt_dir)]


def parse_intruder(text: str, n: int) -> int | None:
    """0-based index from the last `[ANSWER]: k` with 1 <= k <= n."""
    marks = list(_ANSWER.finditer(text or ""))
    if not marks:
        return None
    k = int(marks[-1].group(1))
    return k - 1 if 1 <= k <= n else None


async def score(
    record: LatentRecord,
    explanation,
    client: LLMClient | None,
    *,
    config: IntruderConfig = IntruderConfig(),
    seed: int = 0,
) -> ScoreResult:
    _, used = explanation_parts(explanation or "")
    sample = sample_latent(record, config.sampling, seed, pool=config.pool, exclude_ids=used)
    if isinstance(sample, Skipped):
        return skipped_result(NAME, record, sample, seed)
    k = config.n_examples
    if len(sample.test) < k or not len(sample.negatives):
        return ScoreResult(NAME, record.latent, {}, seed=seed, skipped=f"fewer than {k} test windows")
    rng = rng_for(seed, record.latent, NAME)
    tpl = load_prompt(config.prompt, _VARS, config.prompt_dir)

    def show(tokens, acts):
        mask = highlight_mask(acts, config.threshold * sample.max_act) if config.highlight else None
        return record.prompt_text(tokens, mask)

    # windows cycle through a shuffled order so trials reuse a window only when the test set runs out
    act_order = rng.permutation(len(sample.test))
    neg_order = rng.permutation(len(sample.negatives))
    trials = []
    for t in range(config.n_trials):
        acts_idx = [act_order[(t * k + j) % len(act_order)] for j in range(k)]
        neg = neg_order[t % len(neg_order)]
        pos = int(rng.integers(k + 1))
        lines = [show(sample.test.tokens[i], sample.test.acts[i]) for i in acts_idx]
        lines.insert(pos, show(sample.negatives.tokens[neg], sample.negatives.acts[neg]))
        trials.append((pos, int(sample.negatives.window_ids[neg]), lines))

    async def one(lines):
        params = SamplingParams(max_tokens=config.max_tokens, temperature=config.temperature, seed=seed)
        return await client.complete(tpl.render(examples=numbered(lines)), params)

    done = await gather_or_cancel(*(one(lines) for _, _, lines in trials))
    usage, rows, model = Usage(), [], ""
    for (pos, wid, _), c in zip(trials, done):
        usage.add(c.usage)
        model = model or c.model
        rows.append({"intruder_pos": pos, "intruder_window": wid, "answer": parse_intruder(c.text, k + 1)})
    answered = [r for r in rows if r["answer"] is not None]
    acc = (sum(r["answer"] == r["intruder_pos"] for r in answered) / len(answered)) if answered else None
    metrics = {"accuracy": acc, "chance": 1.0 / (k + 1), "n": len(rows), "n_failed": len(rows) - len(answered)}
    details = {"n_calls": len(trials), "trials": rows}
    return ScoreResult(NAME, record.latent, metrics, details, usage, tpl.version,
                       model or getattr(client, "model", ""), seed)
