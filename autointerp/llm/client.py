"""Client factory, response cache + pricing wrapper, and usage accounting.

    client = make_client("openai", model="gpt-4o-mini")                       # API key from $OPENAI_API_KEY
    client = make_client("openai", model="Qwen/Qwen2.5-7B-Instruct", base_url="http://gpu1:8000/v1")
    client = client_from_spec("openai:llama3.1:8b@http://localhost:11434/v1")  # the CLI form
    client = client_from_spec("local")                                          # in-process SmolLM2

Spec strings (CLI `--explainer`, `--judge`):
    openai:MODEL                 OpenAI-compatible server at $OPENAI_BASE_URL, else api.openai.com
    openai:MODEL@BASE_URL        e.g. openai:Qwen/Qwen2.5-7B-Instruct@http://127.0.0.1:8000/v1
                                 (MODEL may contain ':' and '/', as in Ollama's llama3.1:8b)
    local                        the in-process builtin:smollm2
    local:MODEL_SPEC             anything autointerp.hf_loading.load_causal_lm accepts (builtin:NAME, folder, hub id)

Usage accounting. Every completion made through a client from make_client is added to
  * `client.usage_total` - everything this client did;
  * `meter.total` when the client was made with `meter=` (share one meter between the explainer and judge
    clients of a job for the job total);
  * every `usage_scope()` open in the current context (contextvars: it follows into tasks started inside it):

        async with usage_scope() as u:          # or: with meter.scope("latent-12") as u:
            await explainer.explain(...)
        result.usage = u                        # calls, tokens, cost, cached_calls of this block only

A cached answer costs nothing: its Usage has calls=0, cached_calls=1, cost_usd=0 and the token counts it had
when first made in cached_prompt_tokens / cached_completion_tokens.
"""

from __future__ import annotations

import contextvars
import logging
from pathlib import Path
from typing import Mapping

from .base import ChatMessage, Completion, LLMClient, SamplingParams, Usage
from .cache import DEFAULT, ResponseCache, cache_key, cacheable, resolve_cache_path
from .pricing import PriceTable

log = logging.getLogger(__name__)

_SCOPES: contextvars.ContextVar[tuple[Usage, ...]] = contextvars.ContextVar("autointerp_llm_scopes", default=())


class usage_scope:
    """Accumulate the usage of every completion made in this context (sync or async `with`).

    Pass `into` to add to an existing Usage (e.g. the same latent over several blocks)."""

    def __init__(self, into: Usage | None = None):
        self.usage = into if into is not None else Usage()
        self._token: contextvars.Token | None = None

    def __enter__(self) -> Usage:
        self._token = _SCOPES.set(_SCOPES.get() + (self.usage,))
        return self.usage

    def __exit__(self, *exc) -> None:
        _SCOPES.reset(self._token)

    async def __aenter__(self) -> Usage:
        return self.__enter__()

    async def __aexit__(self, *exc) -> None:
        self.__exit__(*exc)


class UsageMeter:
    """Totals for a job: `total`, and `by_scope[name]` for each `scope(name)` (e.g. one per latent)."""

    def __init__(self) -> None:
        self.total = Usage()
        self.by_scope: dict[str, Usage] = {}

    def scope(self, name: str) -> usage_scope:
        return usage_scope(into=self.by_scope.setdefault(name, Usage()))

    def record(self, usage: Usage) -> None:
        self.total.add(usage)


def _record(usage: Usage, *targets: Usage) -> None:
    seen: set[int] = set()
    for u in (*targets, *_SCOPES.get()):
        if id(u) not in seen:  # the same Usage opened twice (nested scopes) counts once
            seen.add(id(u))
            u.add(usage)


class MeteredClient:
    """An LLMClient around a backend: response cache, cost per call, usage totals. What make_client returns."""

    def __init__(
        self,
        backend: LLMClient,
        cache: ResponseCache | None = None,
        prices: PriceTable | None = None,
        meter: UsageMeter | None = None,
    ):
        self.backend = backend
        self.model = getattr(backend, "model_name", None) or backend.model  # local: "+int8" when quantized
        self.cache = cache
        self.prices = prices or PriceTable()
        self.meter = meter
        self.usage_total = Usage()

    @property
    def supports_logprobs(self) -> bool:
        return self.backend.supports_logprobs

    async def complete(self, messages: list[ChatMessage], params: SamplingParams | None = None) -> Completion:
        params = params or SamplingParams()
        key = None
        if self.cache is not None and cacheable(params):
            key = cache_key(self.model, messages, params, endpoint=getattr(self.backend, "base_url", None),
                            extra_body=getattr(self.backend, "extra_body", None))
            hit = self.cache.get(key)
            if hit is not None:
                self._account(hit.usage)
                return hit
        c = await self.backend.complete(messages, params)
        c.usage.cost_usd = (
            0.0
            if getattr(self.backend, "cost_free", False)
            else self.prices.cost(self.model, c.usage.prompt_tokens, c.usage.completion_tokens)
        )
        if key is not None:
            try:
                self.cache.put(key, c)
            except Exception as e:  # a full disk or locked file must not fail a paid call
                log.warning("response cache write failed (%s): %s", self.cache.path, e)
        self._account(c.usage)
        return c

    def _account(self, usage: Usage) -> None:
        _record(usage, self.usage_total, *((self.meter.total,) if self.meter else ()))

    async def aclose(self) -> None:
        """Close this event loop's HTTP connections (call before the loop ends, or use `async with client:`)."""
        close = getattr(self.backend, "aclose", None)
        if close is not None:
            await close()
        if self.cache is not None:
            self.cache.close()

    async def __aenter__(self) -> "MeteredClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()


def make_client(
    backend: str = "openai",
    model: str | None = None,
    base_url: str | None = None,
    api_key_env: str | None = "OPENAI_API_KEY",
    concurrency: int = 8,
    timeout: float = 60.0,
    max_retries: int = 5,
    cache_path: str | Path | None = DEFAULT,
    prices: PriceTable | str | Path | Mapping | None = None,
    meter: UsageMeter | None = None,
    **backend_opts,
) -> MeteredClient:
    """Build a client. cache_path: DEFAULT ($AUTOINTERP_LLM_CACHE or ~/.cache/autointerp/llm_cache.sqlite),
    None (no cache) or a path. prices: a PriceTable, a dict, or a JSON/TOML file overriding the defaults.
    backend_opts go to the backend (openai: backoff_base, backoff_max, max_retry_after, supports_logprobs,
    extra_body, rng; local: device, dtype)."""
    if backend == "openai":
        from .openai_backend import OpenAIBackend

        b = OpenAIBackend(
            model=model or "",
            base_url=base_url,
            api_key_env=api_key_env,
            concurrency=concurrency,
            timeout=timeout,
            max_retries=max_retries,
            **backend_opts,
        )
    elif backend == "local":
        from .local_backend import DEFAULT_LOCAL_MODEL, LocalBackend

        b = LocalBackend(model=model or DEFAULT_LOCAL_MODEL, **backend_opts)
    else:
        from ..errors import ConfigError

        raise ConfigError(f"LLM backend {backend!r}: expected 'openai' or 'local'")
    path = resolve_cache_path(cache_path)
    cache = ResponseCache(path) if path is not None else None
    return MeteredClient(b, cache=cache, prices=PriceTable.load(prices), meter=meter)


def parse_spec(spec: str) -> dict:
    """'openai:MODEL[@BASE_URL]' | 'local[:MODEL_SPEC]' -> {'backend', 'model', 'base_url'} (see module doc)."""
    from ..errors import ConfigError

    spec = spec.strip()
    backend, _, rest = spec.partition(":")
    if backend == "local":
        return {"backend": "local", "model": rest or None, "base_url": None}
    if backend == "openai":
        model, base_url = rest, None
        for scheme in ("@http://", "@https://"):
            i = rest.find(scheme)
            if i >= 0:
                model, base_url = rest[:i], rest[i + 1 :]
                break
        if model:
            return {"backend": "openai", "model": model, "base_url": base_url}
    raise ConfigError(
        f"LLM spec {spec!r}: expected 'openai:MODEL', 'openai:MODEL@http://HOST:PORT/v1', 'local' or 'local:MODEL'"
    )


def client_from_spec(spec: str, **kwargs) -> MeteredClient:
    """make_client from a spec string; kwargs (concurrency, timeout, cache_path, ...) are passed through."""
    parsed = parse_spec(spec)
    if parsed["base_url"] is not None:
        kwargs.setdefault("base_url", parsed["base_url"])
    return make_client(backend=parsed["backend"], model=parsed["model"], **kwargs)
