"""What the API needs beyond the store: a latent's display examples from its extraction cache (decoded tokens with
per-token activations), and the subject model + dictionary for "which latents fire on this text" and steering.

Everything heavy is loaded once per process and kept (caches, tokenizers, models: small LRU maps); model use is
serialised by the model's own lock (autointerp.steering.model_lock), since hooks are global to a model.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from functools import lru_cache

from typing import Any

import numpy as np

from ..errors import ConfigError

log = logging.getLogger(__name__)
_LOCK = threading.Lock()


class _LRU:
    def __init__(self, size: int):
        self.size, self.items, self.lock = size, OrderedDict(), threading.Lock()

    def get(self, key, make):
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
        value = make()
        with self.lock:
            self.items[key] = value
            while len(self.items) > self.size:
                self.items.popitem(last=False)
        return value


_CACHES = _LRU(16)
_MODELS = _LRU(2)
_DICTS = _LRU(4)


def open_cache(dictionary: dict, store=None):
    """Where a dictionary's examples are read on this machine (its cache folder, else the store), or None."""
    from ..store.examples import open_examples

    key = (str(dictionary.get("cache_path")), dictionary.get("id"), str(dictionary.get("n_tokens")), repr(store))

    def make():
        try:
            return open_examples(dictionary, store)
        except ConfigError as e:
            log.warning("dictionary %s: examples unreadable (%s)", dictionary.get("name"), e)
            return None

    return _CACHES.get(key, make)


@lru_cache(maxsize=8)
def tokenizer_for(model_spec: str):
    """The subject model's tokenizer, or None when it cannot be loaded here (tokens then show as ids)."""
    from ..hf_loading import load_tokenizer

    try:
        return load_tokenizer(model_spec)
    except Exception as e:  # noqa: BLE001 — a display nicety; the ids are still shown
        log.warning("tokenizer of %s not loadable (%s): tokens are shown as ids", model_spec, e)
        return None


class TokenDecoder:
    """id -> display string, memoised (a page shows a few thousand tokens drawn from a small vocabulary)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.memo: dict[int, str] = {}

    def _miss(self, i: int) -> str:
        s = self.tok.decode([i]) if self.tok is not None else f"#{i}"
        self.memo[i] = s
        return s

    def __call__(self, ids) -> list[str]:
        memo, miss = self.memo, self._miss
        return [memo[i] if i in memo else miss(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]


_DECODERS: dict[str, TokenDecoder] = {}


def decoder_for(model_spec: str) -> TokenDecoder:
    with _LOCK:
        d = _DECODERS.get(model_spec)
    if d is None:
        d = TokenDecoder(tokenizer_for(model_spec))
        with _LOCK:
            _DECODERS[model_spec] = d
    return d


def _rows(examples, decode, limit: int | None = None) -> list[dict]:
    n = len(examples) if limit is None else min(limit, len(examples))
    if n == 0:
        return []
    acts = np.round(np.asarray(examples.acts[:n], np.float64), 4)
    peaks = acts.max(axis=1).tolist() if acts.shape[1] else [0.0] * n
    toks = np.asarray(examples.tokens[:n]).tolist()
    wins = np.asarray(examples.window_ids[:n]).tolist()
    return [{"window": w, "tokens": decode(t), "token_ids": t, "acts": a, "max_act": m}
            for w, t, a, m in zip(wins, toks, acts.tolist(), peaks)]


def latent_examples(dictionary: dict, index: int, n_top: int = 20, n_quantiles: int = 4,
                    per_quantile: int = 5, store=None) -> dict[str, Any] | None:
    """{top: [...], quantiles: [{label, lo, hi, examples}], hist_edges} from the cache, or None without one.
    Quantiles: the uniform random sample of activating windows, split by window max into equal-count strata
    (highest first), as the explainers' quantile sampling sees them."""
    cache = open_cache(dictionary, store)
    if cache is None or not 0 <= index < cache.n_latents:
        return None
    decode = decoder_for(cache.manifest["model"])
    rows, acts = cache.kept("top", index)
    top = cache._examples(rows, acts)
    srows, sacts = cache.kept("sample", index)
    sample = cache._examples(srows, sacts)
    quantiles = []
    if len(sample):
        order = np.argsort(-sample.max_acts, kind="stable")
        for q, part in enumerate(np.array_split(order, min(n_quantiles, len(order)))):
            if not len(part):
                continue
            ex = sample.take(part[np.linspace(0, len(part) - 1, min(per_quantile, len(part))).astype(int)])
            m = sample.max_acts[part]
            quantiles.append({"label": f"Q{q + 1}", "lo": float(m.min()), "hi": float(m.max()),
                              "examples": _rows(ex, decode)})
    edges = cache.hist_edges
    return {"top": _rows(top, decode, n_top), "quantiles": quantiles,
            "hist_edges": None if edges is None else [float(e) for e in edges], "ctx_len": cache.ctx_len,
            "tokens_decoded": decode.tok is not None}


# ------------------------------------------------------------------------------------------ model-backed endpoints


def subject_for(model_spec: str, device: str | None = None):
    from ..subject import load_subject

    return _MODELS.get((model_spec, device), lambda: load_subject(model_spec, device=device))


def dictionary_for(cache, device: str | None = None):
    from ..dictionaries import load_cached_dictionary

    entry = cache.manifest["dictionary"]
    return _DICTS.get((str(entry["id"]), int(entry["n_latents"]), str(device)),
                      lambda: load_cached_dictionary(entry, device=device or "cpu"))


def _need_cache(dictionary: dict, store=None):
    cache = open_cache(dictionary, store)
    if cache is None:
        raise ConfigError(f"dictionary {dictionary['name']}: no examples here (cache folder "
                          f"{dictionary.get('cache_path')} absent and none in the store); the subject model and "
                          "checkpoint are found through them")
    return cache


def activations(dictionary: dict, text: str, top_k: int = 5, device: str | None = None, store=None) -> dict:
    """Run the subject model on `text` to the dictionary's hookpoint, encode, and return per token the `top_k`
    latents with their activations (special tokens included, marked)."""
    import torch

    from ..steering import model_lock

    cache = _need_cache(dictionary, store)
    subject = subject_for(cache.manifest["model"], device)
    d = dictionary_for(cache, str(subject.device))
    hook = cache.manifest["hookpoint"]
    with model_lock(subject.model):
        ids = subject.tokenizer(text, return_tensors="pt").input_ids
        limit = subject.max_context or 2048
        ids = ids[:, :limit]
        x = subject.capture(ids, [hook])[hook][0]
        with torch.no_grad():
            codes = d.encode(x.to(dtype=torch.float32))
        if hasattr(codes, "to_dense"):
            codes = codes.to_dense()
        codes = torch.as_tensor(codes).float().cpu()
    special = subject.special_token_mask(ids)[0].tolist()
    k = max(1, min(top_k, codes.shape[-1]))
    vals, idx = torch.topk(codes, k, dim=-1)
    decode = decoder_for(cache.manifest["model"])
    strings = decode(ids[0].tolist())
    tokens = []
    for t in range(codes.shape[0]):
        lat = [{"latent": int(i), "activation": round(float(v), 4)} for v, i in zip(vals[t], idx[t]) if v > 0]
        tokens.append({"position": t, "token": strings[t], "token_id": int(ids[0, t]), "special": bool(special[t]),
                       "latents": lat})
    return {"dictionary": dictionary["name"], "hookpoint": hook, "model": cache.manifest["model"], "tokens": tokens}


STRENGTHS = (0.0, 0.5, 1.0, 2.0)
SIGNED_STRENGTHS = (-2.0, -1.0, 0.0, 1.0, 2.0)  # a pole of a two-sided axis: steer it both ways


def steer(dictionary: dict, latent: int, prompt: str, strengths: list[float] | None, max_new_tokens: int,
          device: str | None = None, store=None) -> dict:
    """Greedy completions of `prompt` with the latent's unit decoder direction added at each strength (multiples of
    the median activation norm at the hookpoint; 0 = the clean completion), as the intervention scorer steers.
    `strengths` None: STRENGTHS, or SIGNED_STRENGTHS for a signed dictionary's poles."""
    if strengths is None:
        strengths = list(SIGNED_STRENGTHS if dictionary.get("signed") else STRENGTHS)
    from ..scorers.intervention import SteeringTarget

    cache = _need_cache(dictionary, store)
    if not 0 <= latent < cache.n_latents:
        raise ConfigError(f"latent {latent} out of range (the dictionary has {cache.n_latents} latents)")
    subject = subject_for(cache.manifest["model"], device)
    d = dictionary_for(cache, str(subject.device))
    # keyed by what the target is made of, not the store's row id (another store's row 1 is another dictionary)
    m = cache.manifest
    target = _DICTS.get(("target", str(m["dictionary"]["id"]), int(m["dictionary"]["n_latents"]), m["hookpoint"],
                         m["model"], str(subject.device)),
                        lambda: SteeringTarget.from_subject(subject, d, cache.manifest["hookpoint"]))
    out = []
    for s in strengths:
        texts, _ = target.run([prompt], latent if s else None, float(s), max_new_tokens)
        out.append({"strength": float(s), "completion": texts[0]})
    return {"dictionary": dictionary["name"], "latent": latent, "prompt": prompt, "hookpoint": target.hookpoint.name,
            "norm": float(target.norm), "completions": out}
