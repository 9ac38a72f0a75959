"""Backend `openai`: any OpenAI-compatible chat-completions server (vLLM, Ollama, llama.cpp, OpenRouter, OpenAI).

Requests go straight through one aiohttp session per (backend, event loop), connections kept alive: the openai
package (and httpx under it) cost ~1.5 ms of CPU per call, a third of a job's worker CPU per latent (issue 19);
aiohttp's C parser a fraction of that. The body, headers, per-read timeout, the proxy from the environment
($HTTPS_PROXY, $NO_PROXY, ...) and the error mapping are those the openai package had.

The retry policy is ours:
  retried  - 429 (honouring Retry-After / retry-after-ms), 408, 5xx, timeouts, connection errors, malformed
             bodies (bad JSON, no choices); exponential backoff with full jitter between attempts
             (`backoff_delay`). 408 "Request Timeout" is retried on purpose although it is a 4xx: the server
             gave up waiting (an overloaded proxy, a slow upload), the request itself is fine - a timeout like ours.
  at once  - 401/403 -> PermanentLLMError "bad credentials ..."; 404 or "model not found" -> PermanentLLMError
             naming the model and base URL; 429 insufficient_quota -> PermanentLLMError; other 4xx ->
             PermanentLLMError, except a prompt longer than the context window -> LLMError (that item fails,
             the job goes on).
Concurrency: one asyncio.Semaphore per (event loop, base URL), shared by every client of that endpoint in the
process; the first live client of an endpoint sets its limit (a later client asking another limit is warned).
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import math
import os
import random
import re
import threading
import time
import weakref
from typing import Any

import aiohttp

from .base import ChatMessage, Completion, LLMError, PermanentLLMError, SamplingParams, TokenLogprob, Usage

log = logging.getLogger(__name__)

OPENAI_BASE_URL = "https://api.openai.com/v1"


class _Endpoint:
    """The concurrency limit of one base URL, shared by every client of it in this process.

    asyncio primitives bind to one event loop, so there is one semaphore per loop."""

    def __init__(self, base_url: str, limit: int):
        self.base_url = base_url
        self.limit = limit
        self._sems: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore]" = (
            weakref.WeakKeyDictionary()
        )

    def semaphore(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        sem = self._sems.get(loop)
        if sem is None:
            sem = self._sems[loop] = asyncio.Semaphore(self.limit)
        return sem


# Weak values: an endpoint is forgotten (and its limit can be set anew) once no client of it is left.
_ENDPOINTS: "weakref.WeakValueDictionary[str, _Endpoint]" = weakref.WeakValueDictionary()
_ENDPOINTS_LOCK = threading.Lock()


def _endpoint(base_url: str, limit: int) -> _Endpoint:
    """The first live client of an endpoint sets its limit; later clients with another limit share it."""
    with _ENDPOINTS_LOCK:
        ep = _ENDPOINTS.get(base_url)
        if ep is None:
            ep = _ENDPOINTS[base_url] = _Endpoint(base_url, limit)
        elif ep.limit != limit:
            log.warning("endpoint %s is already limited to %d concurrent requests; ignoring %d",
                        base_url, ep.limit, limit)
        return ep


def parse_retry_after(headers: Any, now: float | None = None) -> float | None:
    """Seconds to wait from `retry-after-ms`, or `Retry-After` as seconds or an HTTP date; None if absent/bad."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    v = headers.get("retry-after")
    if not v:
        return None
    try:
        return max(0.0, float(v))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(v)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class _Retry(Exception):
    """A transient failure: retry after backoff (at least `retry_after` seconds when the server said so)."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


_MODEL_MISSING = re.compile(r"model.*(not found|does not exist|not exist|unknown|no such)|unknown model", re.I | re.S)
_CONTEXT_LONG = re.compile(r"context length|context window|maximum context|too many tokens|prompt is too long", re.I)


class _StatusError(Exception):
    """A non-2xx answer, shaped as the openai package's APIStatusError: `body` is the `error` object of a JSON body
    (else the body), `code` its code, `message` "Error code: N - <body>"."""

    def __init__(self, status: int, text: str, headers: Any):
        text = text.strip()
        body: Any = text
        try:
            body = json.loads(text)
        except ValueError:
            pass
        self.message = f"Error code: {status} - {body}"
        super().__init__(self.message)
        self.headers = headers
        self.status_code = status
        self.body = body.get("error", body) if isinstance(body, dict) else body
        self.code = self.body.get("code") if isinstance(self.body, dict) else None


def _error_message(e: _StatusError) -> str:
    body = e.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
        if isinstance(inner, str):
            return inner
    return str(e.message or e)[:500]


def _env_proxy(url: str) -> str | None:
    """The proxy that $HTTPS_PROXY / $HTTP_PROXY / $ALL_PROXY name for `url` (None where $NO_PROXY exempts it), read
    once (a session that trusts the environment reads ~/.netrc on every request)."""
    import urllib.parse
    import urllib.request

    parts = urllib.parse.urlsplit(url)
    if urllib.request.proxy_bypass(parts.hostname or ""):
        return None
    proxies = urllib.request.getproxies()
    return proxies.get(parts.scheme) or proxies.get("all") or None


async def _closer(session: aiohttp.ClientSession):
    try:
        yield
    finally:
        await session.close()


class OpenAIBackend:
    """LLMClient over HTTP (aiohttp). `complete` returns a Completion with usage token counts (cost 0:
    pricing is applied by the wrapper in client.py)."""

    cost_free = False

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        api_key_env: str | None = "OPENAI_API_KEY",
        concurrency: int = 8,
        timeout: float = 60.0,
        max_retries: int = 5,
        backoff_base: float = 1.0,
        backoff_max: float = 60.0,
        max_retry_after: float = 300.0,
        supports_logprobs: bool | None = None,
        extra_body: dict | None = None,
        rng: random.Random | None = None,
    ):
        if not model:
            raise PermanentLLMError("openai backend: no model given")
        self.model = model
        self.base_url = (base_url or os.environ.get("OPENAI_BASE_URL") or OPENAI_BASE_URL).rstrip("/")
        self.api_key_env = api_key_env
        key = os.environ.get(api_key_env) if api_key_env else None
        self._key_missing = bool(api_key_env) and not key
        if self._key_missing and self.base_url == OPENAI_BASE_URL:
            raise PermanentLLMError(f"no API key for {self.base_url}: set the env var {api_key_env}")
        # Local servers (vLLM, Ollama, llama.cpp) ignore the key, but the openai package needs a string.
        self._api_key = key or "no-key"
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.backoff_base = float(backoff_base)
        self.backoff_max = float(backoff_max)
        self.max_retry_after = float(max_retry_after)
        self.extra_body = dict(extra_body or {})
        self._endpoint = _endpoint(self.base_url, int(concurrency))
        self.concurrency = self._endpoint.limit
        self._logprobs_configured = supports_logprobs
        self._logprobs_seen: bool | None = None  # learned from responses when not configured
        self._max_tokens_field = "max_tokens"  # switched once if the server asks for max_completion_tokens
        self._clients: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, aiohttp.ClientSession]" = (
            weakref.WeakKeyDictionary()
        )
        self._closers: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any]" = weakref.WeakKeyDictionary()
        self._url = f"{self.base_url}/chat/completions"
        self._proxy = _env_proxy(self._url)
        self._headers = {"Authorization": f"Bearer {self._api_key}", "Accept": "application/json",
                         "Content-Type": "application/json"}
        self._rng = rng or random.Random()  # the jitter's source (pass a seeded one for a reproducible schedule)

    # ---- public -------------------------------------------------------------------------------------------

    @property
    def supports_logprobs(self) -> bool:
        """Configured value, else what responses showed, else True (most OpenAI-compatible servers do)."""
        if self._logprobs_configured is not None:
            return self._logprobs_configured
        return True if self._logprobs_seen is None else self._logprobs_seen

    async def probe_logprobs(self) -> bool:
        """Ask for one token with logprobs and record whether the server returned them."""
        if self._logprobs_configured is not None:
            return self._logprobs_configured
        c = await self.complete(
            [ChatMessage("user", "Say yes.")], SamplingParams(max_tokens=1, logprobs=True, top_logprobs=2)
        )
        self._logprobs_seen = bool(c.logprobs)
        return self._logprobs_seen

    async def complete(self, messages: list[ChatMessage], params: SamplingParams | None = None) -> Completion:
        params = params or SamplingParams()
        last: _Retry | None = None
        attempts = self.max_retries + 1
        for attempt in range(attempts):
            try:
                async with self._endpoint.semaphore():
                    data = await self._post(messages, params)
                return self._parse(data, messages, params)
            except _Retry as e:
                last = e
                if attempt + 1 == attempts:
                    break
                delay = self.backoff_delay(attempt, e.retry_after)
                log.info("%s %s: %s; retry %d/%d in %.2fs", self.base_url, self.model, e, attempt + 1,
                         self.max_retries, delay)
                await asyncio.sleep(delay)  # outside the semaphore: others may use the slot meanwhile
        raise LLMError(f"{self.model} at {self.base_url}: failed after {attempts} attempt(s): {last}") from last

    async def aclose(self) -> None:
        loop = asyncio.get_running_loop()
        client = self._clients.pop(loop, None)
        closer = self._closers.pop(loop, None)
        if client is not None:
            await client.close()
        if closer is not None:
            await closer.aclose()

    # ---- internals ----------------------------------------------------------------------------------------

    async def _client(self) -> aiohttp.ClientSession:
        # An HTTP connection pool belongs to one event loop; its connections are kept alive between requests.
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None or client.closed:
            # the timeout applies to connecting and to each read, as the openai package's (httpx's) did
            client = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.timeout, sock_read=self.timeout),
                connector=aiohttp.TCPConnector(limit=1000), headers=self._headers)
            self._clients[loop] = client
            # closed at the latest when asyncio.run ends the loop (it closes the loop's async generators), so a
            # caller that never calls aclose() leaves no "Unclosed client session" behind
            closer = _closer(client)
            await closer.__anext__()
            self._closers[loop] = closer
        return client

    def backoff_delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait after failed attempt `attempt` (0-based): uniform in [0, min(backoff_max,
        backoff_base * 2**attempt)] ("full jitter": clients that failed together do not retry together), and at
        least what the server asked for in Retry-After, capped at max_retry_after."""
        delay = self._rng.uniform(0.0, min(self.backoff_max, self.backoff_base * 2**attempt))
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.max_retry_after))
        return delay

    def _body(self, messages: list[ChatMessage], params: SamplingParams) -> dict:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": m.role, "content": m.content} for m in messages],
            self._max_tokens_field: params.max_tokens,
            "temperature": params.temperature,
        }
        if params.seed is not None:
            body["seed"] = params.seed
        if params.logprobs:
            body["logprobs"] = True
            if params.top_logprobs > 0:
                body["top_logprobs"] = params.top_logprobs
        return body

    async def _post(self, messages: list[ChatMessage], params: SamplingParams) -> dict:
        body = {**self._body(messages, params), **self.extra_body}
        try:
            # Outer deadline too: the HTTP timeout is per read, a server trickling bytes could exceed it.
            async with asyncio.timeout(self.timeout + 5.0):
                async with (await self._client()).post(self._url, data=json.dumps(body).encode(),
                                                       proxy=self._proxy) as raw:
                    text = await raw.text(errors="replace")
                    if raw.status >= 400:
                        raise _StatusError(raw.status, text, raw.headers)
        except aiohttp.ServerTimeoutError as e:  # connect or a read took longer than `timeout`
            raise _Retry(f"timed out after {self.timeout:g}s") from e
        except TimeoutError as e:
            raise _Retry(f"no complete answer within {self.timeout + 5.0:g}s") from e
        except aiohttp.ClientError as e:  # connection refused/reset, a broken or truncated answer
            raise _Retry(f"connection error: {e}") from e
        except _StatusError as e:
            if self._wants_max_completion_tokens(e):
                self._max_tokens_field = "max_completion_tokens"
                return await self._post(messages, params)
            self._raise_for_status(e)
        try:
            data = json.loads(text)
        except ValueError as e:
            raise _Retry(f"malformed response (not JSON): {text[:200]!r}") from e
        if not isinstance(data, dict):
            raise _Retry(f"malformed response (not an object): {text[:200]!r}")
        return data

    def _wants_max_completion_tokens(self, e: _StatusError) -> bool:
        return (
            e.status_code == 400
            and self._max_tokens_field == "max_tokens"
            and "max_completion_tokens" in _error_message(e)
        )

    def _raise_for_status(self, e: _StatusError) -> None:
        status, msg = e.status_code, _error_message(e)
        where = f"{self.base_url}"
        if status in (401, 403):
            env = f"env var {self.api_key_env}" + (" is not set" if self._key_missing else "")
            if not self.api_key_env:
                env = "no API key configured"
            raise PermanentLLMError(f"bad credentials for {where} ({env}): HTTP {status}: {msg}") from e
        if status == 404 or (status == 400 and _MODEL_MISSING.search(msg)):
            raise PermanentLLMError(
                f"model {self.model!r} not found at {where} (HTTP {status}: {msg}); "
                "check the model name and that the base URL ends in /v1"
            ) from e
        if status == 429:
            code = e.code or ""
            if code == "insufficient_quota" or ("quota" in msg.lower() and "exceeded your" in msg.lower()):
                raise PermanentLLMError(f"quota exhausted at {where}: {msg}") from e
            raise _Retry(f"rate limited (HTTP 429): {msg}", parse_retry_after(e.headers)) from e
        if status == 408:
            raise _Retry(f"server timeout (HTTP 408): {msg}") from e
        if status >= 500:
            raise _Retry(f"server error (HTTP {status}): {msg}", parse_retry_after(e.headers)) from e
        if _CONTEXT_LONG.search(msg):
            raise LLMError(f"prompt too long for {self.model!r} at {where}: {msg}") from e
        raise PermanentLLMError(f"request rejected by {where} for model {self.model!r}: HTTP {status}: {msg}") from e

    def _parse(self, data: dict, messages: list[ChatMessage], params: SamplingParams) -> Completion:
        choices = data.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            err = data.get("error")
            if isinstance(err, dict):  # some proxies (OpenRouter) send errors with HTTP 200
                code = err.get("code")
                msg = f"error in a 200 body: {err.get('message') or err}"
                if code in (401, 403):
                    raise PermanentLLMError(f"bad credentials for {self.base_url} (env var {self.api_key_env}): {msg}")
                raise _Retry(msg)
            raise _Retry(f"malformed response (no choices): {json.dumps(data)[:200]}")
        choice = choices[0]
        message = choice.get("message")
        if not isinstance(message, dict):
            raise _Retry("malformed response (choice without message)")
        text = message.get("content")
        if text is None:
            text = ""  # e.g. a reasoning model that spent max_tokens before answering
        if not isinstance(text, str):
            raise _Retry(f"malformed response (content is {type(text).__name__})")

        logprobs = self._parse_logprobs(choice.get("logprobs")) if params.logprobs else None
        if params.logprobs and self._logprobs_configured is None:
            self._logprobs_seen = logprobs is not None

        usage = Usage(calls=1)
        u = data.get("usage")
        if isinstance(u, dict) and isinstance(u.get("prompt_tokens"), int):
            usage.prompt_tokens = u["prompt_tokens"]
            usage.completion_tokens = int(u.get("completion_tokens") or 0)
        else:  # rough estimate, flagged
            usage.prompt_tokens = estimate_tokens("".join(m.content for m in messages))
            usage.completion_tokens = estimate_tokens(text)
            usage.estimated_calls = 1
        return Completion(text=text, usage=usage, model=self.model, logprobs=logprobs)

    @staticmethod
    def _parse_logprobs(lp: Any) -> list[TokenLogprob] | None:
        if not isinstance(lp, dict) or not isinstance(lp.get("content"), list):
            return None
        out = []
        try:
            for t in lp["content"]:
                top = {a["token"]: float(a["logprob"]) for a in (t.get("top_logprobs") or [])}
                out.append(TokenLogprob(token=t["token"], logprob=float(t["logprob"]), top=top))
        except (KeyError, TypeError, ValueError) as e:
            raise _Retry(f"malformed logprobs: {e}") from e
        return out


def estimate_tokens(text: str) -> int:
    """~4 characters per token: the usual rule of thumb for English BPE vocabularies."""
    return math.ceil(len(text) / 4)
