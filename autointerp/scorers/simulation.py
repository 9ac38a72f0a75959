"""Simulation scorer: an LLM predicts the latent's per-token activation (0-10) from the explanation alone.

Score = Pearson r between predicted and true activations, pooled over every token of the test examples
(activating windows across activation deciles, plus negatives, from `autointerp.sampling`), and per decile
(`pearson_r_q0` = lowest activations; activating windows only).

Two modes:
- "logprob" (all-at-once): the model echoes each token followed by a tab and a 0-10 value; the prediction is the
  expected value of the top-logprob distribution over number tokens at each value position (OpenAI's
  "all at once" simulator, adapted to chat APIs that cannot echo the prompt).
- "json": the model answers {"1": [[token, value], ...], ...}; used when the backend gives no logprobs.
Several examples go in one call. Echoed rows are aligned to the true tokens by position: a missing row predicts 0
and counts in n_failed_tokens; an example with no parsable row at all is left out and counts in n_failed_examples.
"""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..aio import gather_or_cancel
from ..errors import ConfigError
from ..formatting import escape_token, neutralise_markers
from ..llm.base import ChatMessage, Completion, LLMClient, SamplingParams, TokenLogprob, Usage
from ..metrics import pearson_r
from ..prompt_files import load_prompt
from ..records import Examples, LatentRecord
from ..sampling import NegativePool, SamplingConfig, Skipped, sample_latent
from .base import ScoreResult, explanation_parts

NAME = "simulation"


@dataclass
class SimulationConfig:
    # the job's sampling config (its explainer-set fields keep the test set disjoint from what the explainer saw)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    # echoing every token is costly: by default a smaller test set than the job's (one window per decile + a few
    # negatives); None = the sampling config's own sizes
    n_test: int | None = 10
    n_negatives: int | None = 5
    pool: NegativePool | None = field(default=None, compare=False)  # hard negatives (see autointerp.sampling)
    examples_per_call: int = 5
    mode: str = "auto"  # "auto" (logprob when the client supports it) | "logprob" | "json"
    top_logprobs: int = 15
    max_tokens: int | None = None  # default: enough to echo a whole batch
    prompt: str = "simulation"
    prompt_json: str = "simulation_json"
    prompt_dir: Path | None = None  # None: the packaged prompts/
    max_concurrency: int = 4


Config = SimulationConfig
_VARS = {"explanation", "examples"}
_HEADER = re.compile(r"^\s*#+\s*Example\s*(\d+)\s*:?\s*$", re.I)
_ROW = re.compile(r"^(.*?)[\t ]+(-?\d+(?:\.\d+)?)\s*$")
_LONE = re.compile(r"^()\s*(-?\d+(?:\.\d+)?)\s*$")


# ---------------------------------------------------------------- test examples



def select_test_examples(
    record: LatentRecord, sampling: SamplingConfig, seed: int, pool: NegativePool | None = None,
    exclude_ids: tuple[int, ...] = (),
) -> tuple[Examples, np.ndarray] | Skipped:
    """The latent's test set from `autointerp.sampling` (disjoint from the explainer set that the same sampling
    config and seed give, and from `exclude_ids`): activating windows then negatives.
    Labels: activation decile (0 = lowest), -1 = negative."""
    s = sample_latent(record, sampling, seed, pool=pool, exclude_ids=exclude_ids)
    if isinstance(s, Skipped):
        return s
    parts = [p for p in (s.test, s.negatives) if len(p)]
    ex = Examples.concat(parts) if parts else Examples.empty(record.ctx_len)
    labels = np.concatenate([np.asarray(s.test_quantile, np.int64), np.full(len(s.negatives), -1, np.int64)])
    return ex, labels


# ---------------------------------------------------------------- prompt building


def _show(tok: str) -> str:
    # one row per token: escape_token shows newlines as ↵ and tabs as spaces, so a token never breaks its row
    return neutralise_markers(escape_token(tok))


def format_examples(token_lists: list[list[str]]) -> str:
    blocks = []
    for j, toks in enumerate(token_lists, 1):
        blocks.append(f"## Example {j}\n" + "\n".join(_show(t) for t in toks))
    return "\n\n".join(blocks)


# ---------------------------------------------------------------- parsing


def _number_ev(logprobs: list[TokenLogprob], k: int) -> float | None:
    """Expected value over the 0-10 number tokens among the top logprobs at token k (renormalised); None if none.

    Tokenizers that split digits (Llama-2, Qwen, SmolLM) write 10 as "1" "0": when "1" is the token chosen at k,
    the next token's distribution splits the "1" mass between 1 and 10. When another digit was chosen that split is
    unknown and "1" counts as 1.
    """
    t = logprobs[k]
    top = t.top or {t.token: t.logprob}
    probs: dict[int, float] = {}
    for tok, lp in top.items():
        s = tok.strip()
        if s.isdigit() and 0 <= int(s) <= 10:
            probs[int(s)] = probs.get(int(s), 0.0) + float(np.exp(lp))
    if not probs:
        return None
    if 10 not in probs and 1 in probs and t.token.strip() == "1" and k + 1 < len(logprobs):
        nxt = logprobs[k + 1]
        p0 = sum(float(np.exp(lp)) for tok, lp in (nxt.top or {nxt.token: nxt.logprob}).items() if tok.startswith("0"))
        p0 = min(p0, 1.0)
        probs[10], probs[1] = probs[1] * p0, probs[1] * (1 - p0)
    den = sum(probs.values())
    return sum(v * p for v, p in probs.items()) / den


def parse_rows(text: str, logprobs: list[TokenLogprob] | None = None) -> dict[int, list[tuple[str, float]]]:
    """Parse '## Example k' blocks of 'token<TAB>value' rows. With logprobs, each value is the expected value at the
    position where the number was written."""
    if logprobs:
        joined = "".join(t.token for t in logprobs)
        if joined == text or not text:
            text = joined
        else:
            logprobs = None  # cannot map characters to tokens: fall back to the written numbers
    starts = []
    if logprobs:
        pos = 0
        for t in logprobs:
            starts.append(pos)
            pos += len(t.token)
    out: dict[int, list[tuple[str, float]]] = {}
    current: list | None = None
    offset = 0
    for line in text.splitlines(keepends=True):
        body = line.rstrip("\r\n")
        h = _HEADER.match(body)
        if h:
            current = out.setdefault(int(h.group(1)), [])
        elif current is not None and body.strip():
            m = _ROW.match(body) or _LONE.match(body)  # a lone number: the token was blank
            if m:
                value = min(max(float(m.group(2)), 0.0), 10.0)
                if logprobs:
                    ev = _number_ev(logprobs, bisect.bisect_right(starts, offset + m.start(2)) - 1)
                    if ev is not None:
                        value = ev
                current.append((m.group(1), value))
        offset += len(line)
    return out


def _find_json(text: str):
    text = re.sub(r"```(?:json)?", "", text)
    start = text.find("{")
    end = text.rfind("}")
    if start >= 0 and end > start:
        try:
            return json.loads(text[start : end + 1])
        except json.JSONDecodeError:
            pass
    return None


def parse_json(text: str) -> dict[int, list[tuple[str, float]]]:
    """Parse {"k": [[token, value], ...]}; tolerant: fences, prose around it, one broken example among good ones."""
    obj = _find_json(text)
    if not isinstance(obj, dict):
        # salvage example by example: '"k": [ ... ]' with a balanced bracket scan
        obj = {}
        for m in re.finditer(r'"(?:example\s*)?(\d+)"\s*:\s*\[', text, re.I):
            depth, i = 0, m.end() - 1
            for i in range(m.end() - 1, len(text)):
                depth += {"[": 1, "]": -1}.get(text[i], 0)
                if depth == 0:
                    break
            try:
                obj[m.group(1)] = json.loads(text[m.end() - 1 : i + 1])
            except json.JSONDecodeError:
                continue
    out: dict[int, list[tuple[str, float]]] = {}
    for key, rows in obj.items():
        num = re.search(r"\d+", str(key))  # "1", "Example 1", ...
        if num is None or not isinstance(rows, list):
            continue
        parsed = []
        for row in rows:
            if isinstance(row, (list, tuple)) and len(row) >= 2:
                tok, val = row[0], row[-1]
            elif isinstance(row, dict) and len(row) == 1:
                (tok, val), = row.items()
            else:
                tok, val = "", None
            try:
                parsed.append((str(tok), min(max(float(val), 0.0), 10.0)))
            except (TypeError, ValueError):
                parsed.append((str(tok), float("nan")))  # kept for alignment, counted as a failed token
        out[int(num.group())] = parsed
    return out


def align(rows: list[tuple[str, float]] | None, n_tokens: int) -> tuple[np.ndarray | None, int]:
    """Predictions for n_tokens by position; (None, n) when nothing parsed. Missing/unparsable rows predict 0."""
    if not rows:
        return None, n_tokens
    pred = np.zeros(n_tokens, np.float32)
    vals = np.array([v for _, v in rows[:n_tokens]], np.float32)
    ok = ~np.isnan(vals)
    pred[: len(vals)][ok] = vals[ok]
    failed = int((~ok).sum()) + max(0, n_tokens - len(rows)) + max(0, len(rows) - n_tokens)
    return pred, failed


# ---------------------------------------------------------------- metrics


def pearson(pred: np.ndarray, true: np.ndarray) -> float | None:
    """Pearson r; 0.0 when the predictions are constant but the truth is not (a simulator that predicts nothing
    explains nothing: None would drop the latent from the aggregates instead), None when the truth is constant."""
    pred, true = np.asarray(pred, np.float64), np.asarray(true, np.float64)
    if len(pred) >= 2 and np.ptp(pred) == 0 and np.ptp(true) > 0:
        return 0.0
    return pearson_r(pred, true)


# ---------------------------------------------------------------- scorer


def _capped(cfg: SimulationConfig) -> SamplingConfig:
    s = cfg.sampling
    n_test = s.n_test if cfg.n_test is None else min(s.n_test, cfg.n_test)
    n_neg = s.n_negatives if cfg.n_negatives is None else min(s.n_negatives, cfg.n_negatives)
    return dataclasses.replace(s, n_test=n_test, n_negatives=n_neg, min_test=min(s.min_test, n_test),
                               min_negatives=min(s.min_negatives, n_neg))


def _resolve_mode(cfg: SimulationConfig, client: LLMClient) -> str:
    if cfg.mode == "auto":
        return "logprob" if getattr(client, "supports_logprobs", False) else "json"
    if cfg.mode not in ("logprob", "json"):
        raise ConfigError(f"simulation: mode must be auto, logprob or json (got {cfg.mode!r})")
    return cfg.mode


def preflight(config: SimulationConfig, client: LLMClient | None) -> list:
    """The template(s) score() may use, loaded. "auto" checks both: the mode can change once the client learns
    that its server sends no logprobs."""
    if client is None:
        raise ConfigError("simulation scorer needs an LLM client")
    if config.mode == "auto":
        names = [config.prompt, config.prompt_json]
    else:
        names = [config.prompt if _resolve_mode(config, client) == "logprob" else config.prompt_json]
    return [load_prompt(n, _VARS, config.prompt_dir) for n in names]


async def score(
    record: LatentRecord,
    explanation,
    client: LLMClient | None,
    *,
    config: SimulationConfig | None = None,
    seed: int = 0,
) -> ScoreResult:
    """`explanation`: a str, an Explanation (its example windows stay out of the test set) or a Skipped."""
    cfg = config or SimulationConfig()
    if client is None:
        raise ConfigError("simulation scorer needs an LLM client")
    mode = _resolve_mode(cfg, client)
    tpl = load_prompt(cfg.prompt if mode == "logprob" else cfg.prompt_json, _VARS, cfg.prompt_dir)
    result = ScoreResult(NAME, record.latent, {}, prompt_version=tpl.version, model=getattr(client, "model", ""),
                         seed=seed)
    if isinstance(explanation, Skipped):
        result.skipped = explanation.reason
        return result
    explanation, used = explanation_parts(explanation)
    picked = select_test_examples(record, _capped(cfg), seed, cfg.pool, used)
    if isinstance(picked, Skipped):
        result.skipped = picked.reason
        return result
    ex, labels = picked

    token_lists = [record.token_strings(t) for t in ex.tokens]
    step = cfg.examples_per_call
    batches = [list(range(i, min(i + step, len(ex)))) for i in range(0, len(ex), step)]
    max_tokens = cfg.max_tokens or cfg.examples_per_call * (ex.tokens.shape[1] * 6 + 12) + 32
    params = SamplingParams(
        max_tokens=max_tokens, temperature=0.0, seed=seed,
        logprobs=mode == "logprob", top_logprobs=cfg.top_logprobs if mode == "logprob" else 0,
    )
    sem = asyncio.Semaphore(cfg.max_concurrency)

    async def run(batch: list[int]) -> tuple[list[int], Completion]:
        examples = format_examples([token_lists[j] for j in batch])
        msgs: list[ChatMessage] = tpl.render(explanation=explanation, examples=examples)
        async with sem:
            return batch, await client.complete(msgs, params)

    usage = Usage()
    preds: list[np.ndarray | None] = [None] * len(ex)
    n_failed_tokens = 0
    no_logprobs = 0
    for batch, comp in await gather_or_cancel(*(run(b) for b in batches)):
        usage.add(comp.usage)
        if mode == "logprob":
            no_logprobs += comp.logprobs is None
            parsed = parse_rows(comp.text, comp.logprobs)
        else:
            parsed = parse_json(comp.text)
        for k, j in enumerate(batch, 1):
            pred, failed = align(parsed.get(k), len(token_lists[j]))
            preds[j] = pred
            if pred is not None:
                n_failed_tokens += failed

    ok = np.array([p is not None for p in preds])
    truth = ex.acts.astype(np.float64)
    metrics: dict[str, float | None] = {
        "n_examples": float(len(ex)),
        "n_failed": float((~ok).sum()),  # examples with no parsable prediction (the aggregates' key)
        "n_failed_examples": float((~ok).sum()),
        "n_failed_tokens": float(n_failed_tokens),
    }
    if ok.any():
        P = np.stack([p for p in preds if p is not None]).astype(np.float64)
        T, L = truth[ok], labels[ok]
        metrics["pearson_r"] = pearson(P.ravel(), T.ravel())
        act = L >= 0
        if act.any():
            metrics["pearson_r_activating"] = pearson(P[act].ravel(), T[act].ravel())
        for q in range(cfg.sampling.n_quantiles):
            sel = L == q
            if sel.any():
                metrics[f"pearson_r_q{q}"] = pearson(P[sel].ravel(), T[sel].ravel())
        if (L < 0).any():
            metrics["mean_pred_negative"] = float(P[L < 0].mean())
        fire = T > 0
        metrics["mean_pred_firing"] = float(P[fire].mean()) if fire.any() else None
    else:
        metrics["pearson_r"] = None
        result.skipped = "no parsable simulation output"
    result.metrics = metrics
    result.usage = usage
    scale = 10.0 / max(float(record.stats.max_act), float(truth.max()), 1e-9)
    result.details = {
        "mode": mode,
        "calls_without_logprobs": no_logprobs,
        "examples": [
            {
                "window_id": int(ex.window_ids[j]),
                "quantile": int(labels[j]),
                "true": np.round(truth[j] * scale, 2).tolist(),  # on the prompt's 0-10 scale
                "pred": None if preds[j] is None else np.round(preds[j], 2).tolist(),
            }
            for j in range(len(ex))
        ],
    }
    return result
