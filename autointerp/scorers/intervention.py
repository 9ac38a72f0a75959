"""Intervention scorer: does the explanation let a judge tell which completion was steered along the latent?

The subject model is steered at the dictionary's hookpoint along the latent's unit decoder direction, at several
strengths given as multiples of the median activation norm at that hookpoint, on short neutral prompts, with greedy
completions. For each (prompt, strength > 0) the judge sees the steered and the clean completion in shuffled order and
picks the one the explanation predicts. Metrics: judge accuracy (overall and per strength) and the effect size:
KL(steered || clean) of the next-token distribution at the end of the prompt, averaged over prompts, per strength.

Pairs whose two completions are identical are not sent to the judge and count as half right (a coin flip).
Runs where the subject model lives (the GPU queue); the model work happens in a worker thread, one latent at a time.
"""

from __future__ import annotations

import asyncio
import re
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError
from ..formatting import escape_token, neutralise_markers
from ..llm.base import LLMClient, SamplingParams, Usage
from ..prompt_files import load_prompt
from ..records import LatentRecord
from ..sampling import Skipped
from ..steering import activation_norm, steer
from ..subject import Hookpoint, resolve_hookpoint
from .base import ScoreResult
from .base import explanation_parts

NAME = "intervention"

DEFAULT_PROMPTS = (
    "I think that",
    "Yesterday, I went to",
    "The most important thing is",
    "Here is a short story:",
    "My favorite",
    "In the news today,",
    "She looked at the",
    "One thing I learned is",
)
# texts for the typical activation norm at the hookpoint (any ordinary prose works)
NORM_TEXTS = (
    "The weather was mild and the streets were full of people walking to work.",
    "He opened the book, read the first page twice, and then put it back on the shelf.",
    "Scientists measured the temperature of the lake every morning for a year.",
    "If you want to learn a language, practice a little every day.",
)


class SteeringTarget:
    """The subject model, the hookpoint to steer and the latents' decoder directions; built once per dictionary.

    Caches the clean completions and the activation norm, and serialises model use (hooks are global to the
    model, so two latents must never be steered at once).
    """

    def __init__(self, model, tokenizer, hookpoint: str | Hookpoint, directions, *, norm: float | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.hookpoint = hookpoint if isinstance(hookpoint, Hookpoint) else resolve_hookpoint(model, hookpoint)
        self._directions = directions  # [n_latents, d] tensor, or a Dictionary (decoder_directions() read lazily)
        self._norm = norm
        self._clean: dict[tuple, tuple[list[str], torch.Tensor]] = {}
        self.lock = threading.RLock()

    @classmethod
    def from_subject(cls, subject, dictionary, hookpoint: str | None = None, **kw) -> "SteeringTarget":
        """Steer where the dictionary's decoder writes: its hookpoint; for a transcoder (which reads the input of
        its hookpoint module and predicts the output) the output of that module."""
        name = hookpoint or getattr(dictionary, "hookpoint", None)
        if not name:
            raise ConfigError("intervention: the dictionary names no hookpoint; pass hookpoint=")
        hp = resolve_hookpoint(subject.model, name)
        if getattr(dictionary, "transcoder", False) and hookpoint is None and hp.mode == "input":
            hp = Hookpoint(f"{hp.module_path}:output", hp.module_path, "output", hp.module)
        return cls(subject.model, subject.tokenizer, hp, dictionary, **kw)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def direction(self, latent: int) -> torch.Tensor:
        if not isinstance(self._directions, torch.Tensor):
            d = self._directions.decoder_directions()
            self._directions = d if isinstance(d, torch.Tensor) else torch.as_tensor(np.asarray(d))
        if not 0 <= latent < self._directions.shape[0]:
            raise ConfigError(f"intervention: latent {latent} out of range (0..{self._directions.shape[0] - 1})")
        v = self._directions[latent].detach().float()
        n = v.norm()
        if n == 0:
            raise ConfigError(f"intervention: latent {latent} has a zero decoder direction")
        return v / n

    @property
    def norm(self) -> float:
        if self._norm is None:
            with self.lock:
                self._norm = activation_norm(self.model, self.tokenizer, self.hookpoint, list(NORM_TEXTS))
        return self._norm

    @torch.no_grad()
    def _generate(self, prompts: list[str], max_new_tokens: int) -> tuple[list[str], torch.Tensor]:
        tok = self.tokenizer
        side = tok.padding_side
        tok.padding_side = "left"  # so every prompt ends at the last position
        try:
            enc = tok(list(prompts), return_tensors="pt", padding=True).to(self.device)
        finally:
            tok.padding_side = side
        out = self.model.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=False, output_logits=True,
            return_dict_in_generate=True, pad_token_id=tok.pad_token_id,
            temperature=None, top_p=None, top_k=None,
        )
        new = out.sequences[:, enc.input_ids.shape[1]:]
        texts = [tok.decode(s, skip_special_tokens=True) for s in new]
        first = torch.log_softmax(out.logits[0].float(), dim=-1)  # raw logits of the first generated token
        return texts, first.cpu()

    def run(self, prompts: list[str], latent: int | None, strength: float, max_new_tokens: int):
        """(completions, next-token logprobs [n_prompts, vocab]); latent None or strength 0 = clean (cached)."""
        key = (tuple(prompts), max_new_tokens)
        with self.lock:
            if latent is None or strength == 0:
                if key not in self._clean:
                    self._clean[key] = self._generate(prompts, max_new_tokens)
                return self._clean[key]
            alpha = strength * self.norm
            with steer(self.model, self.hookpoint, self.direction(latent), alpha):
                return self._generate(prompts, max_new_tokens)


def kl_divergence(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row, from log-probabilities."""
    return (logp.exp() * (logp - logq)).sum(-1).clamp_min(0.0)


@dataclass
class InterventionConfig:
    # either a ready SteeringTarget, or the subject model + dictionary (what interpret's scorer_context passes)
    # from which one is built on first use and kept (it caches the clean completions across latents)
    target: SteeringTarget | None = field(default=None, compare=False)
    subject: Any = field(default=None, compare=False, repr=False)  # autointerp.subject.SubjectModel
    dictionary: Any = field(default=None, compare=False, repr=False)
    hookpoint: str | None = None  # default: the dictionary's (a transcoder's: its module's output)
    strengths: tuple[float, ...] = (0.5, 1.0, 2.0)  # multiples of the median activation norm at the hookpoint
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    max_new_tokens: int = 16
    pairs_per_call: int = 12
    prompt: str = "intervention"
    judge_max_tokens: int = 8  # per pair

    def get_target(self) -> SteeringTarget:
        if self.target is None:
            if self.subject is None or self.dictionary is None:
                raise ConfigError("intervention scorer needs config.target, or config.subject and config.dictionary")
            self.target = SteeringTarget.from_subject(self.subject, self.dictionary, self.hookpoint)
        return self.target


Config = InterventionConfig
_VARS = {"explanation", "pairs"}
_ANSWER = re.compile(r"^\W*(?:pair\s*)?(\d+)\s*[:.)\-]?\s*\(?\s*([AB])\b", re.I | re.M)


def _show(text: str) -> str:
    return neutralise_markers(escape_token(text)).strip() or "(empty)"


def format_pairs(pairs: list[tuple[str, str, str]]) -> str:
    return "\n\n".join(
        f"Pair {i}\nPrompt: {_show(p)}\nA: {_show(a)}\nB: {_show(b)}" for i, (p, a, b) in enumerate(pairs, 1)
    )


def parse_answers(text: str, n: int) -> dict[int, str]:
    out: dict[int, str] = {}
    for m in _ANSWER.finditer(text):
        k = int(m.group(1))
        if 1 <= k <= n and k not in out:
            out[k] = m.group(2).upper()
    return out


def _steer_all(target: SteeringTarget, latent: int, cfg: InterventionConfig):
    prompts = list(cfg.prompts)
    clean_text, clean_lp = target.run(prompts, None, 0.0, cfg.max_new_tokens)
    runs = {}
    for s in cfg.strengths:
        texts, lp = target.run(prompts, latent, s, cfg.max_new_tokens)
        runs[s] = (texts, kl_divergence(lp, clean_lp).numpy())
    return clean_text, runs


async def score(
    record: LatentRecord,
    explanation,
    client: LLMClient | None,
    *,
    config: InterventionConfig | None = None,
    seed: int = 0,
) -> ScoreResult:
    """`explanation`: a str, an Explanation or a Skipped. Only record.latent is used (the direction's row)."""
    cfg = config or InterventionConfig()
    if isinstance(explanation, Skipped):
        return ScoreResult(NAME, record.latent, {}, seed=seed, skipped=explanation.reason)
    explanation, _ = explanation_parts(explanation)
    target = cfg.get_target()
    if client is None:
        raise ConfigError("intervention scorer needs a judge LLM client")
    tpl = load_prompt(cfg.prompt, _VARS)
    clean, runs = await asyncio.to_thread(_steer_all, target, record.latent, cfg)

    rng = np.random.default_rng([seed, record.latent])
    items = []  # one per (strength > 0, prompt)
    for s in cfg.strengths:
        if s == 0:
            continue
        for i, p in enumerate(cfg.prompts):
            steered_first = bool(rng.integers(2))
            a, b = (runs[s][0][i], clean[i]) if steered_first else (clean[i], runs[s][0][i])
            items.append({"strength": s, "prompt": p, "a": a, "b": b, "steered": "A" if steered_first else "B",
                          "identical": runs[s][0][i] == clean[i], "answer": None})

    to_judge = [it for it in items if not it["identical"]]
    batches = [to_judge[i : i + cfg.pairs_per_call] for i in range(0, len(to_judge), cfg.pairs_per_call)]
    usage = Usage()

    async def judge(batch):
        pairs = format_pairs([(it["prompt"], it["a"], it["b"]) for it in batch])
        msgs = tpl.render(explanation=explanation, pairs=pairs)
        params = SamplingParams(max_tokens=cfg.judge_max_tokens * len(batch) + 16, temperature=0.0, seed=seed)
        return batch, await client.complete(msgs, params)

    for batch, comp in await asyncio.gather(*(judge(b) for b in batches)):
        usage.add(comp.usage)
        answers = parse_answers(comp.text, len(batch))
        for k, it in enumerate(batch, 1):
            it["answer"] = answers.get(k)

    def credit(it) -> float | None:
        if it["identical"]:
            return 0.5
        return None if it["answer"] is None else float(it["answer"] == it["steered"])

    metrics: dict[str, float | None] = {}
    scored = [(it["strength"], credit(it)) for it in items]
    vals = [c for _, c in scored if c is not None]
    metrics["accuracy"] = float(np.mean(vals)) if vals else None
    for s in cfg.strengths:
        key = f"{s:g}"
        metrics[f"kl_s{key}"] = float(runs[s][1].mean())
        if s != 0:
            v = [c for st, c in scored if st == s and c is not None]
            metrics[f"accuracy_s{key}"] = float(np.mean(v)) if v else None
    nonzero = [s for s in cfg.strengths if s != 0]
    metrics["kl_mean"] = float(np.mean([runs[s][1].mean() for s in nonzero])) if nonzero else 0.0
    metrics["n_pairs"] = float(len(items))
    metrics["n_identical"] = float(sum(it["identical"] for it in items))
    metrics["n_failed"] = float(sum(it["answer"] is None and not it["identical"] for it in items))

    res = ScoreResult(NAME, record.latent, metrics, usage=usage, prompt_version=tpl.version,
                      model=getattr(client, "model", ""), seed=seed)
    if not vals:
        res.skipped = "judge gave no parsable answer" if to_judge else "no strengths > 0 to judge"
    res.details = {
        "norm": target.norm,
        "hookpoint": target.hookpoint.name,
        "clean": clean,
        "pairs": items,
        "kl_per_prompt": {f"{s:g}": np.round(runs[s][1], 5).tolist() for s in cfg.strengths},
    }
    return res
