"""Shared machinery of the detection and fuzzing scorers: batch, ask, parse, turn into metrics.

A judge gets the explanation and a numbered batch of examples and answers a list `[1, 0, 1, …]` of the batch's
length. The batches of one latent go out concurrently. An answer without a 0/1 list of the right length fails
its whole batch: those examples count in `n_failed` and stay out of every metric (never read as 0).
When the completion carries logprobs, P(1) of each list entry comes from the top alternatives of its digit
token, which gives an AUC; otherwise `auc` is None.
"""

from __future__ import annotations

import bisect
import itertools
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..aio import gather_or_cancel
from ..formatting import numbered
from ..llm.base import Completion, LLMClient, SamplingParams, Usage
from ..metrics import binary_metrics, per_group_accuracy
from ..prompt_files import load_prompt

_LIST = re.compile(r"\[([^\[\]]*)\]")
_WORDS = {"0": 0, "1": 1, "true": 1, "false": 0, "yes": 1, "no": 0}
PROMPT_VARS = {"explanation", "examples", "n"}


@dataclass
class Item:
    text: str  # the rendered example (one line)
    label: int  # ground truth 0/1
    quantile: int  # activation decile of the window, -1 for negatives
    window_id: int
    tag: str = ""  # e.g. "hard" negative, "wrong" highlights


@dataclass
class Outcome:
    pred: np.ndarray  # [n] 0/1, -1 where the batch failed
    prob: np.ndarray  # [n] P(1), nan where unknown
    usage: Usage
    n_calls: int
    prompt_version: str
    model: str
    failures: list[str]  # one short reason per failed batch


def parse_answer(text: str, n: int) -> tuple[list[int], list[tuple[int, int]]] | None:
    """The last bracketed 0/1 list of length n in the text, with each entry's character span."""
    for m in reversed(list(_LIST.finditer(text or ""))):
        entries = [(e.group(0), e.span()) for e in re.finditer(r"[^\s,;]+", m.group(1))]
        vals = [_WORDS.get(e.strip("'\"").lower()) for e, _ in entries]
        if len(vals) == n and all(v is not None for v in vals):
            off = m.start(1)
            # span of the value itself (a quote before it may be a token of its own)
            return vals, [(a + off + len(e) - len(e.lstrip("'\"")), b + off) for e, (a, b) in entries]
    return None


_PUNCT = " ,;[]\n'\""


def probs_from_logprobs(completion: Completion, spans: list[tuple[int, int]]) -> list[float] | None:
    """P(1) per list entry, from the top alternatives of the token holding it; None when not alignable
    (tokens do not spell the text, an entry is not a lone 0/1 token, or one token holds two entries)."""
    lps = completion.logprobs
    if not lps or "".join(t.token for t in lps) != completion.text:
        return None
    starts = list(itertools.accumulate((len(t.token) for t in lps), initial=0))
    out, seen = [], set()
    for a, _ in spans:
        k = bisect.bisect_right(starts, a) - 1  # plain lists: numpy's per-call overhead was ~1 ms per latent
        t = lps[k]
        if k in seen or t.token.strip(_PUNCT) not in ("0", "1"):
            return None
        seen.add(k)
        alts = dict(t.top or {})
        alts.setdefault(t.token, t.logprob)
        p1 = sum(math.exp(v) for tok, v in alts.items() if tok.strip(_PUNCT) == "1")
        p0 = sum(math.exp(v) for tok, v in alts.items() if tok.strip(_PUNCT) == "0")
        out.append(p1 / (p1 + p0) if p1 + p0 > 0 else float(t.token.strip(_PUNCT) == "1"))
    return out


def split_batches(n: int, batch_size: int) -> list[np.ndarray]:
    """ceil(n / batch_size) batches of near-equal size (17+17+16, not 20+20+10)."""
    if n == 0:
        return []
    return [b for b in np.array_split(np.arange(n), math.ceil(n / max(1, batch_size))) if len(b)]


async def classify(
    items: list[Item],
    explanation: str,
    client: LLMClient,
    *,
    prompt: str,
    prompt_dir: Path | None,
    batch_size: int,
    rng: np.random.Generator,
    temperature: float = 0.0,
    max_tokens: int | None = None,
    seed: int = 0,
) -> Outcome:
    """Shuffle the items (deterministically), ask the judge one batch per call, all batches at once."""
    tpl = load_prompt(prompt, PROMPT_VARS, prompt_dir)
    n = len(items)
    order = rng.permutation(n)
    batches = [order[b] for b in split_batches(n, batch_size)]
    want_lp = bool(getattr(client, "supports_logprobs", False))
    expl = " ".join(explanation.split())  # one line, like the examples

    async def one(idx: np.ndarray):
        messages = tpl.render(explanation=expl, examples=numbered([items[i].text for i in idx]), n=str(len(idx)))
        params = SamplingParams(
            max_tokens=max_tokens or 4 * len(idx) + 16,
            temperature=temperature,
            seed=seed,
            logprobs=want_lp,
            top_logprobs=5 if want_lp else 0,
            answer_bits=len(idx),
        )
        return idx, await client.complete(messages, params)

    done = await gather_or_cancel(*(one(b) for b in batches))
    pred = np.full(n, -1, np.int64)
    prob = np.full(n, np.nan)
    usage, failures, model = Usage(), [], ""
    for idx, c in done:
        usage.add(c.usage)
        model = model or c.model
        parsed = parse_answer(c.text, len(idx))
        if parsed is None:
            failures.append(f"no 0/1 list of length {len(idx)} in answer: {c.text[:80]!r}")
            continue
        vals, spans = parsed
        pred[idx] = vals
        p = probs_from_logprobs(c, spans) if c.logprobs else None
        if p is not None:
            prob[idx] = p
    return Outcome(pred, prob, usage, len(batches), tpl.version, model or getattr(client, "model", ""), failures)


def outcome_metrics(items: list[Item], out: Outcome, n_quantiles: int) -> tuple[dict, dict]:
    """(metrics, details) from an Outcome; failed examples excluded and counted."""
    label = np.array([it.label for it in items], np.int64)
    quant = np.array([it.quantile for it in items], np.int64)
    ok = out.pred >= 0
    have_prob = ok & ~np.isnan(out.prob)
    # AUC only when every answered example has a probability: a partial AUC would be over a biased subset
    probs = out.prob[ok] if ok.any() and have_prob.sum() == ok.sum() else None
    m = binary_metrics(label[ok], out.pred[ok], probs)
    m["n_failed"] = int((~ok).sum())
    m["n"] = len(items)
    acc = per_group_accuracy(label[ok], out.pred[ok], quant[ok]) if ok.any() else {}
    for q in range(n_quantiles):
        m[f"accuracy_q{q}"] = acc.get(q)
    if (quant < 0).any():
        m["accuracy_negatives"] = acc.get(-1)
    details = {
        "n_calls": out.n_calls,
        "failures": out.failures,
        "examples": [
            {"window_id": it.window_id, "label": it.label, "quantile": it.quantile, "tag": it.tag,
             "pred": int(p) if p >= 0 else None, "prob": None if np.isnan(pr) else round(float(pr), 4)}
            for it, p, pr in zip(items, out.pred, out.prob)
        ],
    }
    return m, details
