"""Explainers: prompt building and answer parsing for each kind, plus two LLM-free baselines.

LLM kinds (one call each): `default` (activating tokens marked <<…>>), `activations` (marks + a 0-10 value per
activating token), `cot` (reasons step by step first), `contrastive` (also shows similar windows where the latent
is silent), `meta` (a meta-dictionary's latent from its base latents' explanations; autointerp.meta). Baselines: `random` (another latent's explanation, deterministic per seed) and `token_frequency`
("fires on: a, b, …" from the most frequent activating tokens).

Every kind sees the explainer windows as display windows (`SamplingConfig.display_ctx` tokens around each window's
peak, the same view the detection and fuzzing judges get; see autointerp.sampling).

Hardening: examples are escaped by `formatting` (no `<<`/`>>` or answer marker can come from example text), and
the answer is read after the LAST `[EXPLANATION]:` marker; without a marker the last non-empty line is used and
the result says `parsed=False`.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .errors import ConfigError
from .formatting import escape_token, highlight_mask, neutralise_markers, numbered, render_activation_list
from .llm.base import LLMClient, SamplingParams, Usage
from .prompt_files import load_prompt
from .records import LatentRecord
from .sampling import LatentSample, NegativePool, SamplingConfig, Skipped, rng_for, sample_latent

LLM_EXPLAINERS = ("default", "activations", "cot", "contrastive", "meta")
BASELINES = ("random", "token_frequency")
EXPLAINERS = LLM_EXPLAINERS + BASELINES

_MARKER = re.compile(r"\[\s*EXPLANATION\s*\]\s*:?", re.I)


@dataclass(frozen=True)
class ExplainConfig:
    sampling: SamplingConfig = SamplingConfig()
    threshold: float = 0.3  # mark tokens above this fraction of the latent's max activation
    max_tokens: int = 200
    cot_max_tokens: int = 1000
    temperature: float = 0.0
    n_frequency_tokens: int = 10  # token_frequency baseline
    prompt_dir: Path | None = None  # None: the packaged prompts/
    pool: NegativePool | None = field(default=None, compare=False)  # hard negatives for `contrastive`
    random_pool: Mapping[int, str] | None = field(default=None, compare=False)  # latent -> explanation


@dataclass
class Explanation:
    latent: int
    text: str
    kind: str
    prompt_version: str  # "" for baselines without a prompt
    model: str  # "" for baselines
    seed: int
    usage: Usage = field(default_factory=Usage)
    examples_used: tuple[int, ...] = ()  # window ids shown to the explainer (never in a test set)
    raw: str = ""  # the full LLM answer
    parsed: bool = True  # False: no [EXPLANATION]: marker, text is a fallback


def check_kind(kind: str) -> None:
    if kind not in EXPLAINERS:
        raise ConfigError(f"unknown explainer {kind!r}; valid explainers: {', '.join(EXPLAINERS)}")


def parse_explanation(text: str) -> tuple[str, bool]:
    """(explanation, found_marker). Reads after the last marker; strips markdown/quotes; one line."""
    marks = list(_MARKER.finditer(text or ""))
    if marks:
        body, ok = text[marks[-1].end():], True
    else:
        lines = [ln for ln in (text or "").splitlines() if ln.strip()]
        body, ok = (lines[-1] if lines else ""), False
    body = " ".join(body.split())
    return body.strip(" *_`\"'").strip(), ok


def _prompt_name(kind: str) -> str:
    return f"explain_{kind}"


_VARS = {"default": {"examples"}, "activations": {"examples"}, "cot": {"examples"},
         "contrastive": {"examples", "negatives"}, "meta": {"members"}}


def templates(kind: str, config: ExplainConfig = ExplainConfig()) -> list:
    """The prompt template an explainer kind uses, loaded (so checked) now; none for the baselines."""
    check_kind(kind)
    if kind not in LLM_EXPLAINERS:
        return []
    return [load_prompt(_prompt_name(kind), _VARS[kind], config.prompt_dir)]


def build_messages(record: LatentRecord, sample: LatentSample, kind: str, config: ExplainConfig):
    """(messages, prompt_version, window ids used) for an LLM explainer kind."""
    tpl = load_prompt(_prompt_name(kind), _VARS[kind], config.prompt_dir)
    thr = config.threshold * sample.max_act
    ex = sample.shown("explain")
    lines = []
    for toks, acts in zip(ex.tokens, ex.acts):
        line = record.prompt_text(toks, highlight_mask(acts, thr))
        if kind == "activations":
            line += "\n   Activations: " + render_activation_list(record.token_strings(toks), acts, sample.max_act,
                                                                   thr)
        lines.append(line)
    values = {"examples": numbered(lines)}
    used = [int(i) for i in ex.window_ids]
    if kind == "contrastive":
        neg = sample.shown("explain_negatives")
        values["negatives"] = numbered([record.prompt_text(t) for t in neg.tokens]) or "(none)"
        used += [int(i) for i in neg.window_ids]
    return tpl.render(**values), tpl.version, tuple(used)


async def _explain_meta(record, client: LLMClient | None, config: ExplainConfig, seed: int):
    """One call: the explanations of the base latents the meta-latent fires on (the explainer's half), strongest
    first."""
    if not record.explain:
        return Skipped("none of the base latents it fires on is explained", record.latent)
    if client is None:
        raise ConfigError("explainer 'meta' needs an LLM client")
    tpl = load_prompt(_prompt_name("meta"), _VARS["meta"], config.prompt_dir)
    messages = tpl.render(members=numbered([neutralise_markers(escape_token(m["explanation"])) for m in record.explain]))
    params = SamplingParams(max_tokens=config.max_tokens, temperature=config.temperature, seed=seed,
                            answer_prefix="[EXPLANATION]:")
    completion = await client.complete(messages, params)
    text, ok = parse_explanation(completion.text)
    if not text:
        return Skipped("explainer answer held no explanation", record.latent, usage=completion.usage)
    return Explanation(record.latent, text, "meta", tpl.version, completion.model or getattr(client, "model", ""),
                       seed, usage=completion.usage, examples_used=tuple(m["unit"] for m in record.explain),
                       raw=completion.text, parsed=ok)


def token_frequency_explanation(record: LatentRecord, sample: LatentSample, threshold: float, n: int) -> str:
    """'fires on: a, b, …' — activating tokens by count in the explainer set as displayed (what an LLM explainer
    sees; ties: total activation, text)."""
    count: Counter = Counter()
    mass: Counter = Counter()
    thr = threshold * sample.max_act
    shown = sample.shown("explain")
    for toks, acts in zip(shown.tokens, shown.acts):
        strs = record.token_strings(toks)
        for k in np.flatnonzero(highlight_mask(acts, thr)):
            t = _token_label(strs[k])
            if t:
                count[t] += 1
                mass[t] += float(acts[k])
    best = sorted(count, key=lambda t: (-count[t], -mass[t], t))[:n]
    return "fires on: " + ", ".join(best) if best else ""


def _token_label(text: str) -> str:
    """A token as the baseline names it: its text with whitespace runs collapsed; a whitespace-only token by what it
    is (latents that fire on line breaks were skipped as 'no token above the highlight threshold')."""
    t = " ".join(text.split())
    if t or not text:
        return t
    return "line break" if "\n" in text or "\r" in text else "tab" if "\t" in text else "space"


def random_explanation(latent: int, pool: Mapping[int, str] | Sequence[str], seed: int) -> str | None:
    """Another latent's explanation, the same for the same (latent, seed)."""
    items = sorted(pool.items()) if isinstance(pool, Mapping) else list(enumerate(pool))
    others = [t for k, t in items if k != latent and t]
    if not others:
        return None
    return others[int(rng_for(seed, latent, "random").integers(len(others)))]


async def explain(
    record: LatentRecord,
    client: LLMClient | None,
    *,
    kind: str = "default",
    config: ExplainConfig = ExplainConfig(),
    seed: int = 0,
    sample: LatentSample | None = None,
) -> Explanation | Skipped:
    check_kind(kind)
    if kind == "random":
        if config.random_pool is None:
            raise ConfigError("explainer 'random' needs ExplainConfig.random_pool (other latents' explanations)")
        text = random_explanation(record.latent, config.random_pool, seed)
        if text is None:
            return Skipped("no other latent's explanation to draw from", record.latent)
        return Explanation(record.latent, text, kind, "", "", seed)

    meta = getattr(record, "members_only", False)  # a meta-latent (autointerp.meta.MetaRecord): no tokens
    if meta != (kind == "meta"):
        raise ConfigError(f"latent {record.latent}: explainer {kind!r} " + (
            "reads token examples; a meta-dictionary's latents are explained with --explainer meta" if meta else
            "explains a meta-dictionary's latents (register one with `autointerp meta-members --save`)"))
    if meta:
        return await _explain_meta(record, client, config, seed)
    if sample is None:
        # only the contrastive kind shows negatives: the others skip embedding the explainer windows for them
        sample = sample_latent(record, config.sampling, seed, pool=config.pool,
                               explain_negatives=kind == "contrastive")
    if isinstance(sample, Skipped):
        return sample
    used = tuple(int(i) for i in sample.explain.window_ids)
    if kind == "token_frequency":
        text = token_frequency_explanation(record, sample, config.threshold, config.n_frequency_tokens)
        if not text:
            return Skipped("no token above the highlight threshold", record.latent)
        return Explanation(record.latent, text, kind, "", "", seed, examples_used=used)

    if client is None:
        raise ConfigError(f"explainer {kind!r} needs an LLM client")
    messages, version, used = build_messages(record, sample, kind, config)
    max_tokens = config.cot_max_tokens if kind == "cot" else config.max_tokens
    # every explainer prompt ends its answer with the marked line: a backend that can prefill (local) starts there
    params = SamplingParams(max_tokens=max_tokens, temperature=config.temperature, seed=seed,
                            answer_prefix="[EXPLANATION]:")
    completion = await client.complete(messages, params)
    text, ok = parse_explanation(completion.text)
    if not text:
        return Skipped("explainer answer held no explanation", record.latent, usage=completion.usage)
    return Explanation(record.latent, text, kind, version, completion.model or getattr(client, "model", ""), seed,
                       usage=completion.usage, examples_used=used, raw=completion.text, parsed=ok)
