"""Intervention scorer: does the explanation let a judge tell which completion was steered along the latent?

The subject model is steered at the dictionary's hookpoint along the latent's unit decoder direction, at several
strengths given as multiples of the median activation norm at that hookpoint, on short neutral prompts, with greedy
completions (`mode="clamp"`: the latent's code is clamped to strength × its max activation instead). For each
(prompt, strength > 0) the judge sees the steered and the clean completion in shuffled order and picks the one the
explanation predicts. Pairs whose two completions are identical are not sent to the judge and
count as half right (a coin flip).

Metrics (overall: over every pair / every strength > 0; `_s{strength}`: one strength):
- `accuracy`: the judge's share of right picks.
- `effect_size` = accuracy - 0.5, the judge's advantage over chance (a two-way choice): what the explanation tells
  about the steering's effect beyond guessing; 0 = nothing (or steering changed nothing), 0.5 = every pick right,
  below 0 = the explanation points the wrong way.
- `activation_change`: does steering along the latent write text the latent itself fires on? For each prompt, the
  latent's max activation over the completion's tokens, read by the dictionary at its own (read) hookpoint while
  the model runs unsteered on prompt + completion; steered minus clean, averaged over prompts (`activation_clean`:
  the clean level). In activation units; None when the target has no dictionary encoder (bare directions).
- `kl_s*`, `kl_mean`: KL(steered || clean) of the next-token distribution at the end of the prompt, averaged over
  prompts: how much steering moves the model at all.

Runs where the subject model lives (the GPU queue); the model work happens in a worker thread, one latent at a time.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..aio import gather_or_cancel
from ..errors import ConfigError
from ..formatting import escape_token, neutralise_markers
from ..llm.base import LLMClient, SamplingParams, Usage
from ..prompt_files import load_prompt
from ..records import LatentRecord
from ..sampling import Skipped
from ..steering import Edit, activation_norm, check_edits, intervene, model_lock, steer, write_directions
from ..subject import Hookpoint, SubjectModel, mlp_read_and_write, resolve_hookpoint, translate_hookpoint
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


STEER_DEFAULT_VALUE = {"add": 1.0, "clamp": 0.0, "ablate": 0.0}


def steer_edit(latent: int, mode: str = "add", value: float | None = None) -> Edit:
    """One edit as the API and the CLI take it (see SteeringTarget.edits_at), its value defaulted per mode: add 1
    (the latent's unit direction × the strength × the median norm), clamp 0 (the latent switched off)."""
    if mode not in STEER_DEFAULT_VALUE:
        raise ConfigError(f"mode {mode!r}: expected one of {', '.join(STEER_DEFAULT_VALUE)}")
    return Edit(int(latent), mode, STEER_DEFAULT_VALUE[mode] if value is None else float(value))


class SteeringTarget:
    """The subject model, the hookpoint to steer and the latents' decoder directions; built once per dictionary.

    Caches the clean completions and the activation norm, and serialises model use (hooks are global to the
    model, so two latents must never be steered at once).
    """

    def __init__(self, model, tokenizer, hookpoint: str | Hookpoint, directions, *, norm: float | None = None,
                 read_hookpoint: str | Hookpoint | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.hookpoint = hookpoint if isinstance(hookpoint, Hookpoint) else resolve_hookpoint(model, hookpoint)
        self._directions = directions  # [n_latents, d] tensor, or a Dictionary (decoder_directions() read lazily)
        # with a Dictionary, where it reads (default: where it is steered) for the activation-change measure
        self.dictionary = None if isinstance(directions, torch.Tensor) else directions
        if read_hookpoint is None or isinstance(read_hookpoint, Hookpoint):
            self.read_hookpoint = read_hookpoint or self.hookpoint
        else:
            self.read_hookpoint = resolve_hookpoint(model, read_hookpoint)
        self._norm = norm
        self._clean: dict[tuple, tuple[list[str], torch.Tensor]] = {}
        self._clean_reads: dict[tuple, list[torch.Tensor | None]] = {}
        self.lock = model_lock(model)  # shared with every other user of this model (e.g. surprisal)

    @classmethod
    def from_subject(cls, subject, dictionary, hookpoint: str | None = None, **kw) -> "SteeringTarget":
        """Steer where the dictionary's decoder writes. `hookpoint` is where the dictionary reads (a cache's
        hookpoint; default: the dictionary's own). An SAE writes where it reads. A transcoder reads the input of
        its module (`mlp_in.N`, `…mlp:input`) and predicts that module's output, so it is steered at the output
        of the same module, whichever of the two names the read side."""
        name = hookpoint or getattr(dictionary, "hookpoint", None)
        if not name:
            raise ConfigError("intervention: the dictionary names no hookpoint; pass hookpoint=")
        hp = read = resolve_hookpoint(subject.model, translate_hookpoint(name))
        if getattr(dictionary, "transcoder", False) and not name.endswith(":output"):
            # (an explicit ':output' read side is kept, as extract keeps it)
            reads, writes = mlp_read_and_write(subject.model, hp)
            if getattr(dictionary, "input_hookpoint", None) and getattr(dictionary, "hookpoint", None):
                writes = translate_hookpoint(dictionary.hookpoint)  # SAELens transcoders name both sides
            read = hp if hp.mode == "input" else resolve_hookpoint(subject.model, reads)
            hp = resolve_hookpoint(subject.model, writes)  # after a sandwich norm where the layer has one
        return cls(subject.model, subject.tokenizer, hp, dictionary, read_hookpoint=read, **kw)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _matrix(self) -> torch.Tensor:
        """The decoder directions [n_latents, d], read from the dictionary once."""
        if not isinstance(self._directions, torch.Tensor):
            d = self._directions.decoder_directions()
            self._directions = d if isinstance(d, torch.Tensor) else torch.as_tensor(np.asarray(d))
        return self._directions

    def direction(self, latent: int) -> torch.Tensor:
        self._matrix()
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

    @torch.no_grad()
    def _reads(self, prompts: list[str], completions: list[str]) -> list[torch.Tensor | None]:
        """Per prompt, the unsteered activations at the read hookpoint over the completion's tokens ([n, d]; None
        for an empty completion). Prompt and completion are tokenized apart, as generate() saw them."""
        sm = SubjectModel(self.model, self.tokenizer)
        out: list[torch.Tensor | None] = []
        for p, c in zip(prompts, completions):
            p_ids = self.tokenizer(p).input_ids
            c_ids = self.tokenizer(c, add_special_tokens=False).input_ids
            if not c_ids:
                out.append(None)
                continue
            x = sm.capture(torch.tensor([p_ids + c_ids]), [self.read_hookpoint])[self.read_hookpoint.name]
            out.append(x[0, len(p_ids):].detach())
        return out

    def latent_activation(self, latent: int, prompts: list[str], completions: list[str],
                          clean_key: tuple | None = None) -> np.ndarray | None:
        """[n_prompts] the latent's max activation over each completion's tokens (nan for an empty one), read by the
        dictionary unsteered; None when there is no dictionary encoder. `clean_key` caches the reads (clean runs
        are the same for every latent)."""
        if self.dictionary is None or not hasattr(self.dictionary, "encode"):
            return None
        with self.lock:
            if clean_key is not None and clean_key in self._clean_reads:
                reads = self._clean_reads[clean_key]
            else:
                reads = self._reads(prompts, completions)
                if clean_key is not None:
                    self._clean_reads[clean_key] = reads
        return np.array([np.nan if x is None else float(self.dictionary.encode(x)[:, latent].max()) for x in reads])

    def _edited(self):
        """What `intervene` edits: the dictionary (clamp encodes with it), else the bare directions."""
        if self.dictionary is not None and hasattr(self.dictionary, "decode"):
            return self.dictionary
        return self._matrix()

    def edits_at(self, edits: list[Edit], strength: float) -> list[Edit]:
        """The edits one strength applies, in `intervene`'s units: add writes strength × value × the median
        activation norm along the latent's unit direction (value 1: what `run(latent=j)` does); clamp sets the code
        to strength × value; ablate is on at any strength but 0. Strength 0 is the clean model: no edits."""
        source = self._edited()
        check_edits(edits, source.shape[0] if isinstance(source, torch.Tensor) else source.n_latents)
        if strength == 0:
            return []
        out = []
        for e in edits:
            v = e.value if e.mode == "ablate" else strength * e.value
            if e.mode == "add" and v:
                size = float(write_directions(source, [e.latent]).norm())
                if size == 0:
                    raise ConfigError(f"intervention: latent {e.latent} has a zero decoder direction")
                v *= self.norm / size
            out.append(Edit(e.latent, e.mode, v))
        return out

    def run(self, prompts: list[str], latent: int | list[Edit] | None, strength: float, max_new_tokens: int):
        """(completions, next-token logprobs [n_prompts, vocab]); latent None or strength 0 = clean (cached).
        `latent`: one latent steered along its unit direction by strength × the median activation norm, or a list
        of edits (scaled by `edits_at`)."""
        key = (tuple(prompts), max_new_tokens)
        with self.lock:
            if latent is None or strength == 0 or (isinstance(latent, list) and not latent):
                if key not in self._clean:
                    self._clean[key] = self._generate(prompts, max_new_tokens)
                return self._clean[key]
            if isinstance(latent, list):
                with self.intervention(latent, strength):
                    return self._generate(prompts, max_new_tokens)
            alpha = strength * self.norm
            with steer(self.model, self.hookpoint, self.direction(latent), alpha):
                return self._generate(prompts, max_new_tokens)

    def intervention(self, edits: list[Edit], strength: float = 1.0):
        """The context manager of `edits` at one strength (see `edits_at`) at this target's hookpoint."""
        return intervene(self.model, self.hookpoint, self.edits_at(edits, strength), self._edited(),
                         read_hookpoint=self.read_hookpoint)

    def sweep(self, prompt: str, edits: list[Edit], strengths: list[float], max_new_tokens: int) -> list[dict]:
        """[{strength, completion}] greedy completions of `prompt` with the edits at each strength (0: clean)."""
        return [{"strength": float(s), "completion": self.run([prompt], edits, float(s), max_new_tokens)[0][0]}
                for s in strengths]


def steering_target(ref: str, *, model: str | None = None, hookpoint: str | None = None, device: str | None = None,
                    edits: list[Edit] = (), label: str = "latent") -> SteeringTarget:
    """The SteeringTarget of a store dictionary or cache folder (its subject model, checkpoint and hookpoint), or,
    with `model`, of a checkpoint (`hookpoint`: where, default what it names). `edits` are checked against its units
    before the model loads where those are known without it (errors say `label`)."""
    from ..cache import LatentCache
    from ..dictionaries import as_units, load_cached_dictionary
    from ..extract import _load_dictionary
    from ..store import open_store
    from ..store.examples import open_cache
    from ..subject import load_subject

    if model is None:
        if Path(ref).expanduser().is_dir():
            cache = LatentCache(Path(ref).expanduser())
        else:
            store = open_store()
            cache = open_cache(store.dictionary(ref), store)
            if cache is None:
                raise ConfigError(f"dictionary {ref}: no examples here, so no subject model or checkpoint to steer")
        check_edits(edits, cache.n_latents, label)
        subject = load_subject(cache.manifest["model"], device=device)
        d = load_cached_dictionary(cache.manifest["dictionary"], device=str(subject.device))
        return SteeringTarget.from_subject(subject, d, cache.manifest["hookpoint"])
    subject = load_subject(model, device=device)
    d = as_units(_load_dictionary(ref, subject, hookpoint, str(subject.device)))
    check_edits(edits, d.n_latents, label)
    if not (hookpoint or d.hookpoint):
        raise ConfigError(f"{ref}: the checkpoint names no hookpoint; pass --hookpoint")
    return SteeringTarget.from_subject(subject, d, hookpoint)


def steer_loss(target: SteeringTarget, corpus, edits: list[Edit], strengths: list[float], *, batch_size: int = 8,
               progress: bool = False):
    """`corpus_loss` of a corpus (CorpusSpec) clean and under `edits` at each strength (keys: the strengths)."""
    from ..steering import corpus_loss

    subject = SubjectModel(target.model, target.tokenizer)
    runs = {s: (lambda s=s: target.intervention(edits, s)) for s in strengths}
    return corpus_loss(subject, corpus, runs, batch_size=batch_size, progress=progress)


CHANCE = 0.5  # the judge picks one of two completions
SCORER_MODES = ("add", "clamp")


def _rounded(a: np.ndarray) -> list:
    return [None if not np.isfinite(v) else round(float(v), 5) for v in a]


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
    hookpoint: str | None = None  # where the dictionary reads (default: its own); a transcoder steers at the output
    strengths: tuple[float, ...] = (0.5, 1.0, 2.0)  # multiples of the median activation norm at the hookpoint
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    max_new_tokens: int = 16
    pairs_per_call: int = 12
    prompt: str = "intervention"
    prompt_dir: Path | None = None  # None: the packaged prompts/
    judge_max_tokens: int = 8  # per pair
    # add: the latent's unit direction × strength × the median norm; clamp: its code set to strength × its max
    # activation (record.stats.max_act). Added later: at its default it stays out of the score's identity.
    mode: str = field(default="add", metadata={"identity_omit_default": True})

    def get_target(self) -> SteeringTarget:
        if self.target is None:
            if self.subject is None or self.dictionary is None:
                raise ConfigError(_NO_TARGET)
            self.target = SteeringTarget.from_subject(self.subject, self.dictionary, self.hookpoint)
        return self.target


Config = InterventionConfig
_NO_TARGET = ("intervention scorer needs config.target, or config.subject and config.dictionary "
              "(the CLI passes the cache's model and dictionary)")
_VARS = {"explanation", "pairs"}
_ANSWER = re.compile(r"^\W*(?:pair\s*)?(\d+)\s*[:.)\-]?\s*\(?\s*([AB])\b", re.I | re.M)


def preflight(config: InterventionConfig, client: LLMClient | None) -> list:
    if client is None:
        raise ConfigError("intervention scorer needs a judge LLM client")
    if config.target is None and (config.subject is None or config.dictionary is None):
        raise ConfigError(_NO_TARGET)
    _check_mode(config.mode)
    return [load_prompt(config.prompt, _VARS, config.prompt_dir)]


def _check_mode(mode: str) -> None:
    if mode not in SCORER_MODES:
        raise ConfigError(f"intervention.mode {mode!r}: expected one of {', '.join(SCORER_MODES)} (ablation removes "
                          "what the explanation predicts, so the judge would have nothing to pick)")


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


def _steer_all(target: SteeringTarget, record: LatentRecord, cfg: InterventionConfig):
    """(clean completions, clean activations or None, {strength: (completions, KL per prompt, activations or None)})"""
    prompts, latent = list(cfg.prompts), record.latent
    clean_text, clean_lp = target.run(prompts, None, 0.0, cfg.max_new_tokens)
    clean_act = target.latent_activation(latent, prompts, clean_text, clean_key=(tuple(prompts), cfg.max_new_tokens))
    steered = latent if cfg.mode == "add" else [Edit(latent, "clamp", float(record.stats.max_act))]
    runs = {}
    for s in cfg.strengths:
        texts, lp = target.run(prompts, steered, s, cfg.max_new_tokens)
        act = clean_act if s == 0 or clean_act is None else target.latent_activation(latent, prompts, texts)
        runs[s] = (texts, kl_divergence(lp, clean_lp).numpy(), act)
    return clean_text, clean_act, runs


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
    _check_mode(cfg.mode)
    target = cfg.get_target()
    if client is None:
        raise ConfigError("intervention scorer needs a judge LLM client")
    tpl = load_prompt(cfg.prompt, _VARS, cfg.prompt_dir)
    clean, clean_act, runs = await asyncio.to_thread(_steer_all, target, record, cfg)

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

    for batch, comp in await gather_or_cancel(*(judge(b) for b in batches)):
        usage.add(comp.usage)
        answers = parse_answers(comp.text, len(batch))
        for k, it in enumerate(batch, 1):
            it["answer"] = answers.get(k)

    answered = any(it["answer"] is not None for it in to_judge)

    def credit(it) -> float | None:
        if it["identical"]:  # the judge cannot tell them apart: chance; but not a score without any judgement
            return 0.5 if answered or not to_judge else None
        return None if it["answer"] is None else float(it["answer"] == it["steered"])

    metrics: dict[str, float | None] = {}
    scored = [(it["strength"], credit(it)) for it in items]
    vals = [c for _, c in scored if c is not None]
    metrics["accuracy"] = float(np.mean(vals)) if vals else None
    metrics["effect_size"] = None if metrics["accuracy"] is None else metrics["accuracy"] - CHANCE

    def act_change(s) -> float | None:  # mean over prompts where both completions have tokens
        d = runs[s][2] - clean_act
        return float(np.nanmean(d)) if np.isfinite(d).any() else None

    has_act = clean_act is not None
    metrics["activation_clean"] = float(np.nanmean(clean_act)) if has_act and np.isfinite(clean_act).any() else None
    for s in cfg.strengths:
        key = f"{s:g}"
        metrics[f"kl_s{key}"] = float(runs[s][1].mean())
        if s != 0:
            v = [c for st, c in scored if st == s and c is not None]
            metrics[f"accuracy_s{key}"] = float(np.mean(v)) if v else None
            metrics[f"effect_size_s{key}"] = float(np.mean(v)) - CHANCE if v else None
            metrics[f"activation_change_s{key}"] = act_change(s) if has_act else None
    nonzero = [s for s in cfg.strengths if s != 0]
    metrics["kl_mean"] = float(np.mean([runs[s][1].mean() for s in nonzero])) if nonzero else 0.0
    changes = [c for c in (act_change(s) for s in nonzero) if c is not None] if has_act else []
    metrics["activation_change"] = float(np.mean(changes)) if changes else None
    metrics["n_pairs"] = float(len(items))
    metrics["n_identical"] = float(sum(it["identical"] for it in items))
    metrics["n_failed"] = float(sum(it["answer"] is None and not it["identical"] for it in items))

    res = ScoreResult(NAME, record.latent, metrics, usage=usage, prompt_version=tpl.version,
                      model=getattr(client, "model", ""), seed=seed)
    if not vals:
        res.skipped = "judge gave no parsable answer" if to_judge else "no strengths > 0 to judge"
    res.details = {
        "norm": target.norm,
        "mode": cfg.mode,
        "hookpoint": target.hookpoint.name,
        "clean": clean,
        "pairs": items,
        "kl_per_prompt": {f"{s:g}": np.round(runs[s][1], 5).tolist() for s in cfg.strengths},
        "read_hookpoint": target.read_hookpoint.name,
        "activation_per_prompt": None if not has_act else {
            "clean": _rounded(clean_act), **{f"{s:g}": _rounded(runs[s][2]) for s in cfg.strengths}},
    }
    return res
