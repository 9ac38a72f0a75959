"""What a job's units need, loaded by the process that runs them (CLI, Celery worker, API) and cached per process:
the cache and its tokenizer, the negative pool's embeddings, scorer configs with their live objects (subject model,
dictionary), the identity keys. LLM clients are made per event loop (`JobContext.clients()`), since an HTTP client
belongs to the loop it was made in.

The negative pool is embedded once per cache and embedder and saved beside the cache folder (`pool_emb-<hash>.npz`),
or in the store when the examples are read from there, so a resume or a second job starts at once; all embedding
runs on one background thread (`embed_executor`), never on the event loop where it would stall every LLM call.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import functools
import logging
import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

import numpy as np

from ..cache import ExampleSource
from ..errors import ConfigError
from ..explainers import LLM_EXPLAINERS, ExplainConfig
from ..explainers import templates as explainer_templates
from ..sampling import NegativePool
from .spec import JobSpec, digest, explain_identity, score_identity

log = logging.getLogger(__name__)

_EMBED = ThreadPoolExecutor(max_workers=1, thread_name_prefix="autointerp-embed")


def embed_executor() -> ThreadPoolExecutor:
    """The one thread that runs sentence embedding (batched per latent; torch releases the GIL meanwhile)."""
    return _EMBED


def pool_examples(cache: ExampleSource):
    from ..records import Examples

    rows = np.sort(np.asarray(cache.pool()["rows"], dtype=np.int64))
    tokens = cache.windows(rows)
    return Examples(rows, tokens, np.zeros(tokens.shape, np.float32))


def _saved_pool(cache: ExampleSource, name: str, store) -> tuple:
    """(read() -> npz bytes or None, write(bytes)) for the pool's embeddings: beside a cache folder, else a blob in
    the store (so every worker embeds a dictionary's pool once, not once per machine)."""
    tag = digest([name, cache.manifest.get("dictionary", {}).get("id")])[:12]
    if cache.path is not None:
        path = cache.path / f"pool_emb-{tag}.npz"

        def write(data: bytes) -> None:
            tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return (lambda: path.read_bytes() if path.is_file() else None), write
    from ..store.examples import get_blob, put_blob

    key = f"examples/{cache.pk}/pool_emb-{tag}"

    def write_blob(data: bytes) -> None:
        with store.tx(write=True) as conn:
            put_blob(conn, key, data)

    def read_blob():
        with store.tx() as conn:
            return get_blob(conn, key)
    return read_blob, write_blob


def load_pool(cache: ExampleSource, embedder: str | None = None, store=None) -> NegativePool:
    """The cache's random pool with its embeddings: read from where they were saved (beside the cache folder, or
    in the store), else embedded now and saved (a read-only place just skips the save)."""
    from ..embedder import embedder_name
    from ..store.examples import npz_arrays, npz_bytes

    name = embedder_name(embedder)
    ex = pool_examples(cache)
    read, write = _saved_pool(cache, name, store or getattr(cache, "store", None))
    try:
        data = read()
        if data is not None:
            z = npz_arrays(data)
            if np.array_equal(z["ids"], ex.window_ids):
                return NegativePool.from_matrix(ex.window_ids, z["vectors"], embedder=embedder)
    except (OSError, ValueError, KeyError):
        log.warning("saved pool embeddings unreadable; embedding the pool again")
    pool = NegativePool.from_examples(ex, cache._decode, embedder=embedder)
    try:
        write(npz_bytes(ids=ex.window_ids, vectors=pool.matrix(ex.window_ids)))
    except Exception as e:  # a read-only folder, a store that refuses: the next process embeds again
        log.info("pool embeddings not saved (%s)", e)
    return pool


@dataclass
class JobContext:
    spec: JobSpec
    dictionary: dict  # the store's row
    cache: ExampleSource
    explain_key: str
    score_keys: dict[str, str]
    explain_config: ExplainConfig
    scorer_configs: list[tuple[Any, Any]]  # (Scorer, its Config with live objects)
    pool: NegativePool | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @asynccontextmanager
    async def clients(self) -> AsyncIterator[tuple[Any, Any]]:
        """(explainer client, judge client) for this event loop; closed at the end. Baselines get None."""
        from ..llm import client_from_spec

        s = self.spec
        llm_explainer = s.explainer in LLM_EXPLAINERS
        needs_judge = any(n not in ("embedding",) for n in s.scorers)
        kw = {"concurrency": s.llm.concurrency, "timeout": s.llm.timeout_s, "max_retries": s.llm.max_retries,
              "api_key_env": s.llm.api_key_env, "prices": s.llm.prices, "backoff_base": s.llm.backoff_base_s}
        if s.llm.response_cache is False:
            kw["cache_path"] = None
        made: dict[str, Any] = {}

        def client(spec: str):
            if spec not in made:
                opts = dict(kw)
                if spec.startswith("local"):  # the in-process backend has no HTTP settings
                    opts = {k: v for k, v in opts.items() if k in ("cache_path", "prices", "concurrency")}
                made[spec] = client_from_spec(spec, **opts)
            return made[spec]

        try:
            yield (client(s.explainer_model) if llm_explainer else None,
                   client(s.judge) if needs_judge and s.scorers else None)
        finally:
            for c in made.values():
                await c.aclose()

    def preflight(self, judge_client) -> None:
        """Every template and scorer config checked before the first LLM call."""
        explainer_templates(self.spec.explainer, self.explain_config)
        for scorer, cfg in self.scorer_configs:
            scorer.preflight(cfg, judge_client)

    def record(self, latent: int):
        return self.cache.record(latent)

    async def warm(self, record) -> None:
        """Embed (off the event loop) every window this latent's sampling will compare with the pool, so the
        explainer's and scorers' sampling later only multiplies cached vectors."""
        if self.pool is None:
            return
        from ..sampling import sample_latent

        samplings = {self.explain_config.sampling} | {getattr(c, "sampling", None) for _, c in self.scorer_configs}
        loop = asyncio.get_running_loop()
        # the explainer windows are embedded only for the contrastive explainer's negatives (sample_latent)
        contrastive = self.spec.explainer == "contrastive"
        for sampling in samplings - {None}:
            # in this context: within the unit's `shared_samples()` the explainer and scorers reuse this sampling
            await loop.run_in_executor(_EMBED, contextvars.copy_context().run, functools.partial(
                sample_latent, record, sampling, self.spec.seed, pool=self.pool,
                explain_negatives=contrastive and sampling == self.explain_config.sampling))


def _tokenizer(cache: ExampleSource):
    from ..hf_loading import load_tokenizer

    return load_tokenizer(cache.manifest["model"])


def _scorer_context(cache: ExampleSource, scorers: list[str]) -> dict:
    """Live objects that some scorers' Configs take by field name: intervention steers the subject model with the
    dictionary's decoder at the cache's hookpoint; surprisal reads with the subject model already loaded."""
    if not {"intervention", "surprisal"} & set(scorers):
        return {}
    from ..dictionaries import load_cached_dictionary
    from ..subject import load_subject

    subject = load_subject(cache.manifest["model"])
    dictionary = load_cached_dictionary(cache.manifest["dictionary"])
    return {"subject": subject, "dictionary": dictionary, "hookpoint": cache.manifest["hookpoint"],
            "lm": (subject.model, subject.tokenizer)}


_CONTEXTS: OrderedDict[tuple, JobContext] = OrderedDict()
_LOCK = threading.Lock()


def load_context(store, spec: JobSpec, dictionary: dict, *, random_pool=None) -> JobContext:
    """The context of (spec, dictionary), built once per process (the last 4 are kept)."""
    from .scoring import scorer_config

    key = (spec.model_dump_json(), dictionary["id"], dictionary.get("cache_path"), dictionary.get("n_tokens"),
           store.url if store is not None else None, ((dictionary.get("manifest") or {}).get("meta") or {}).get(
               "analysis_id"))  # a meta-dictionary registered again reads its new member lists
    with _LOCK:
        if key in _CONTEXTS and random_pool is None:
            _CONTEXTS.move_to_end(key)
            return _CONTEXTS[key]
    if dictionary.get("format") == "meta-dictionary":
        return _remember(key, _meta_context(store, spec, dictionary, random_pool), random_pool)
    from ..store.examples import open_examples

    cache = open_examples(dictionary, store)
    if cache is None:
        raise ConfigError(f"dictionary {dictionary['name']}: no examples on this machine (its cache folder "
                          f"{dictionary.get('cache_path')} is absent and the store holds none: extract it with "
                          "AUTOINTERP_EXAMPLES=store, the default)")
    cache.attach_tokenizer(_tokenizer(cache))
    sampling = spec.sampling_config()
    prompt_dir = Path(spec.prompt_dir) if spec.prompt_dir else None
    expl_cfg = ExplainConfig(sampling=sampling, prompt_dir=prompt_dir, random_pool=random_pool)
    explainer_templates(spec.explainer, expl_cfg)  # a broken template fails before the (slow) pool embedding
    extra = _scorer_context(cache, spec.scorers)
    for name in spec.scorers:
        scorer_config(name, spec, None, extra)  # options checked before the pool embedding too
    pool = load_pool(cache, store=store) if spec.hard_negatives else None
    ek = digest(explain_identity(spec, dictionary["key"]))
    ctx = JobContext(spec=spec, dictionary=dictionary, cache=cache, explain_key=ek,
                     score_keys={s: digest(score_identity(spec, s, ek)) for s in spec.scorers},
                     explain_config=dataclasses.replace(expl_cfg, pool=pool),
                     scorer_configs=[scorer_config(n, spec, pool, extra) for n in spec.scorers],
                     pool=pool, extra=extra)
    return _remember(key, ctx, random_pool)


def _remember(key: tuple, ctx: JobContext, random_pool) -> JobContext:
    if random_pool is None:  # a context with a random pool is the random baseline's, made for one run
        with _LOCK:
            _CONTEXTS[key] = ctx
            while len(_CONTEXTS) > 4:
                _CONTEXTS.popitem(last=False)
    return ctx


def _meta_context(store, spec: JobSpec, dictionary: dict, random_pool) -> JobContext:
    """A meta-dictionary's context: its latents are read from member lists (autointerp.meta.MetaSource); no token
    windows, so no negative pool and no live model objects."""
    from ..meta import MetaSource, meta_spec
    from .scoring import scorer_config

    spec = meta_spec(spec, dictionary)
    expl_cfg = ExplainConfig(sampling=spec.sampling_config(),
                             prompt_dir=Path(spec.prompt_dir) if spec.prompt_dir else None, random_pool=random_pool)
    explainer_templates(spec.explainer, expl_cfg)
    ek = digest(explain_identity(spec, dictionary["key"]))
    return JobContext(spec=spec, dictionary=dictionary, cache=MetaSource(store, dictionary, spec.seed),
                      explain_key=ek, score_keys={s: digest(score_identity(spec, s, ek)) for s in spec.scorers},
                      explain_config=expl_cfg, scorer_configs=[scorer_config(n, spec, None, {}) for n in spec.scorers])
