"""Surprisal scorer (no judge LLM): does reading the explanation make a local LM less surprised by the texts where the
latent fires, more than by texts where it does not?

For each test example (activating windows across quantiles, plus negatives) the local causal LM's mean per-token loss
on the example text is measured after a prefix stating the explanation, and after the same prefix with a neutral
explanation. reduction = loss(neutral) - loss(explanation). Score = ROC AUC of the reduction separating activating from
non-activating examples, plus the mean reductions. Texts are decoded from the record and re-tokenized, so the scorer LM
need not be the subject model. Neutral losses do not depend on the explanation and are cached.
"""

from __future__ import annotations

import asyncio
import copy
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError
from ..hf_loading import DEFAULT_MODEL, load_causal_lm
from ..prompt_files import load_prompt
from ..formatting import plain_text
from ..metrics import roc_auc
from ..records import LatentRecord
from ..sampling import NegativePool, SamplingConfig, Skipped
from ..steering import model_lock
from .base import ScoreResult
from .base import explanation_parts
from .simulation import select_test_examples

NAME = "surprisal"


@dataclass
class SurprisalConfig:
    model: str = DEFAULT_MODEL  # load_causal_lm spec of the scorer LM
    lm: tuple | None = None  # (model, tokenizer) already loaded: overrides `model`
    device: str | None = None
    neutral_explanation: str = "ordinary text on everyday topics"
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    pool: NegativePool | None = field(default=None, compare=False)  # hard negatives (see autointerp.sampling)
    batch_size: int = 16
    prompt: str = "surprisal"
    prompt_dir: Path | None = None  # None: the packaged prompts/

    def __post_init__(self):
        # a loaded model belongs in `lm`; a module here would only fail later, inside a worker thread
        if not isinstance(self.model, str):
            raise ConfigError(f"surprisal: model must be a model spec string, got {type(self.model).__name__} "
                              "(pass a loaded model as lm=(model, tokenizer))")
        if self.lm is not None and (not isinstance(self.lm, (tuple, list)) or len(self.lm) != 2):
            raise ConfigError("surprisal: lm must be a (model, tokenizer) pair")


Config = SurprisalConfig
_VARS = {"explanation"}


def preflight(config: SurprisalConfig, client=None) -> list:
    return [load_prompt(config.prompt, _VARS, config.prompt_dir)]


_lock = threading.Lock()  # one forward pass at a time: the LM is shared and CPU/GPU bound
# and a model passed in `lm` (e.g. the subject model) may be steered by the intervention scorer meanwhile: its
# model_lock keeps those hooks out of our forward passes
_neutral_cache: OrderedDict[tuple, float] = OrderedDict()
_NEUTRAL_MAX = 100_000


@lru_cache(maxsize=2)
def _load(spec: str, device: str | None):
    return load_causal_lm(spec, device=device)


@torch.no_grad()
def text_losses(model, tokenizer, prefix: str, texts: list[str], batch_size: int = 16) -> np.ndarray:
    """Mean next-token loss over each text's own tokens, read after `prefix` (prefix tokens are context only).

    The prefix runs once; its KV cache is copied for every batch of texts (the prefix is usually longer than a
    window, so this is most of the work saved).
    """
    pre = tokenizer(prefix, add_special_tokens=False).input_ids
    if getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id is not None:
        pre = [tokenizer.bos_token_id] + pre
    if not pre:
        raise ValueError("surprisal: the prefix must not be empty")
    # tokenise prefix and text apart so the text's tokens are the same after any prefix
    seqs = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    head = model(input_ids=torch.tensor([pre], device=device), use_cache=True)
    first_lp = torch.log_softmax(head.logits[0, -1].float(), -1)  # predicts each text's first token
    out = np.full(len(texts), np.nan)
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start : start + batch_size]
        B, L = len(chunk), max(1, max(len(t) for t in chunk))
        ids = torch.full((B, L), pad, dtype=torch.long)
        mask = torch.zeros((B, len(pre) + L), dtype=torch.long)
        mask[:, : len(pre)] = 1
        for r, t in enumerate(chunk):
            ids[r, : len(t)] = torch.tensor(t, dtype=torch.long)
            mask[r, len(pre) : len(pre) + len(t)] = 1
        cache = copy.deepcopy(head.past_key_values)
        cache.batch_repeat_interleave(B)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), past_key_values=cache,
                       use_cache=True).logits
        for r, t in enumerate(chunk):
            if not t:
                continue
            lp = torch.log_softmax(logits[r, : len(t) - 1].float(), -1)
            tgt = torch.tensor(t, device=device)
            nll = torch.cat([-first_lp[tgt[:1]], -lp.gather(-1, tgt[1:, None]).squeeze(-1)])
            out[start + r] = float(nll.mean())
    return out


def _prefix(tpl, explanation: str) -> str:
    return "\n\n".join(m.content for m in tpl.render(explanation=explanation)) + "\n"


def _compute(record: LatentRecord, explanation: str, used: tuple[int, ...], cfg: SurprisalConfig, seed: int):
    tpl = load_prompt(cfg.prompt, _VARS, cfg.prompt_dir)
    picked = select_test_examples(record, cfg.sampling, seed, cfg.pool, used)
    if isinstance(picked, Skipped):
        return tpl.version, picked, None, None
    ex, labels = picked
    model, tok = cfg.lm if cfg.lm is not None else _load(cfg.model, cfg.device)
    texts = [plain_text(record.token_strings(t)) for t in ex.tokens]
    neutral_prefix = _prefix(tpl, cfg.neutral_explanation)
    model_id = cfg.model if cfg.lm is None else id(model)
    keys = [(model_id, neutral_prefix, t) for t in texts]
    with _lock, model_lock(model):
        todo = [i for i, k in enumerate(keys) if k not in _neutral_cache]
        if todo:
            for i, v in zip(todo, text_losses(model, tok, neutral_prefix, [texts[i] for i in todo], cfg.batch_size)):
                _neutral_cache[keys[i]] = v
            while len(_neutral_cache) > _NEUTRAL_MAX:
                _neutral_cache.popitem(last=False)
        neutral = np.array([_neutral_cache[k] for k in keys])
        with_expl = text_losses(model, tok, _prefix(tpl, explanation), texts, cfg.batch_size)
    return tpl.version, labels, neutral, with_expl


async def score(
    record: LatentRecord,
    explanation,
    client=None,
    *,
    config: SurprisalConfig | None = None,
    seed: int = 0,
) -> ScoreResult:
    """`explanation`: a str, an Explanation (its example windows stay out of the test set) or a Skipped.
    `client` is unused (the scorer LM is local)."""
    cfg = config or SurprisalConfig()
    if isinstance(explanation, Skipped):
        return ScoreResult(NAME, record.latent, {}, seed=seed, skipped=explanation.reason)
    text, used = explanation_parts(explanation)
    version, labels, neutral, with_expl = await asyncio.to_thread(_compute, record, text, used, cfg, seed)
    model_name = cfg.model if cfg.lm is None else getattr(cfg.lm[0].config, "_name_or_path", "local")
    res = ScoreResult(NAME, record.latent, {}, prompt_version=version, model=model_name, seed=seed)
    if isinstance(labels, Skipped):
        res.skipped = labels.reason
        return res
    red = neutral - with_expl
    ok = ~np.isnan(red)
    y = (labels >= 0).astype(int)
    if not ok.any() or len(set(y[ok])) < 2:
        res.skipped = "need both activating and non-activating examples with text"
        return res
    r, yy = red[ok], y[ok]
    res.metrics = {
        "auc": roc_auc(yy, r),
        "mean_reduction_activating": float(r[yy == 1].mean()),
        "mean_reduction_negative": float(r[yy == 0].mean()),
        "mean_reduction_diff": float(r[yy == 1].mean() - r[yy == 0].mean()),
        "n_activating": float(yy.sum()),
        "n_negative": float((1 - yy).sum()),
    }
    res.details = {
        "quantiles": labels.tolist(),
        "loss_neutral": np.round(neutral, 4).tolist(),
        "loss_explanation": np.round(with_expl, 4).tolist(),
    }
    return res
