"""What the API needs beyond the store: the subject model + dictionary for "which latents fire on this text" and
steering. A latent's display examples (open_cache, latent_examples) and token decoding live in the library
(autointerp.store.examples, autointerp.tokens) and are re-exported here for the routes.

Everything heavy is loaded once per process and kept (caches, tokenizers, models: small LRU maps); model use is
serialised by the model's own lock (autointerp.steering.model_lock), since hooks are global to a model.
"""

from __future__ import annotations

from ..errors import ConfigError
from ..lru import LRU
from ..store.examples import latent_examples, open_cache  # noqa: F401 — the routes' example reads, from the library
from ..tokens import decoder_for

_MODELS = LRU(2)
_DICTS = LRU(4)


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


def reader_for(dictionary: dict, device: str | None = None, store=None):
    """The corpus-level reader (autointerp.corpus_latents) of a stored dictionary, on this process's loaded model."""
    from ..corpus_latents import LatentReader

    cache = _need_cache(dictionary, store)
    subject = subject_for(cache.manifest["model"], device)
    return LatentReader.from_manifest(subject, dictionary_for(cache, str(subject.device)), cache.manifest,
                                      dictionary["name"])


def diff_texts(dictionary: dict, body, device: str | None = None, store=None) -> int:
    """POST /diffs: the CLI's `diff` on the request's texts, stored; returns the analysis id."""
    from ..corpus_latents import Side, run_diff
    from ..steering import model_lock

    reader = reader_for(dictionary, device, store)
    with model_lock(reader.subject.model):
        out = run_diff(reader, Side(body.label_a, texts=body.texts_a), Side(body.label_b, texts=body.texts_b),
                       store=store, dictionary_pk=dictionary["id"], top=body.top, max_tokens=body.max_tokens,
                       alpha=body.alpha, progress=False)
    return int(out["id"])


STRENGTHS = (0.0, 0.5, 1.0, 2.0)
SIGNED_STRENGTHS = (-2.0, -1.0, 0.0, 1.0, 2.0)  # a pole of a two-sided axis: steer it both ways


def steer(dictionary: dict, edits: list, prompt: str, strengths: list[float] | None, max_new_tokens: int,
          device: str | None = None, store=None) -> dict:
    """Greedy completions of `prompt` with `edits` (autointerp.steering.Edit, in SteeringTarget.edits_at's units:
    add along the unit decoder direction by strength × value × the median activation norm at the hookpoint, clamp
    to strength × value, ablate) at each strength (0 = the clean completion), as the intervention scorer steers.
    `strengths` None: STRENGTHS, or SIGNED_STRENGTHS for a signed dictionary's poles; (0, 1) with no add edit."""
    if strengths is None:
        adds = any(e.mode == "add" for e in edits)
        strengths = list(SIGNED_STRENGTHS if dictionary.get("signed") else STRENGTHS) if adds else [0.0, 1.0]
    from ..scorers.intervention import SteeringTarget
    from ..steering import check_edits

    cache = _need_cache(dictionary, store)
    check_edits(edits, cache.n_latents)  # before any model is loaded
    subject = subject_for(cache.manifest["model"], device)
    d = dictionary_for(cache, str(subject.device))
    # keyed by what the target is made of, not the store's row id (another store's row 1 is another dictionary)
    m = cache.manifest
    target = _DICTS.get(("target", str(m["dictionary"]["id"]), int(m["dictionary"]["n_latents"]), m["hookpoint"],
                         m["model"], str(subject.device)),
                        lambda: SteeringTarget.from_subject(subject, d, cache.manifest["hookpoint"]))
    return {"dictionary": dictionary["name"], "latent": edits[0].latent if len(edits) == 1 else None,
            "edits": [{"latent": e.latent, "mode": e.mode, "value": e.value} for e in edits], "prompt": prompt,
            "hookpoint": target.hookpoint.name, "norm": float(target.norm),
            "completions": target.sweep(prompt, edits, strengths, max_new_tokens)}
