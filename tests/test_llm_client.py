"""The openai backend, cache, pricing and usage accounting against a real test-server process."""

from __future__ import annotations

import asyncio
import json
import math
import random
import time

import pytest
from llm_server_fixture import start_llm_server

from autointerp.errors import ConfigError
from autointerp.llm import (
    ChatMessage,
    LLMError,
    PermanentLLMError,
    PriceTable,
    SamplingParams,
    Usage,
    UsageMeter,
    client_from_spec,
    make_client,
    parse_spec,
    usage_scope,
)
from autointerp.llm.cache import resolve_cache_path
from autointerp.llm.openai_backend import OpenAIBackend, parse_retry_after

MSG = [ChatMessage("system", "You are terse."), ChatMessage("user", "Say something.")]


def lp_judge(messages, params):
    """Judge for the server (imported by it from this module): a one-token answer with explicit logprobs."""
    return {
        "text": "Yes",
        "logprobs": [
            {"token": "Yes", "logprob": -0.1, "top_logprobs": [
                {"token": "Yes", "logprob": -0.1},
                {"token": "No", "logprob": -2.4},
                {"token": "Maybe", "logprob": -5.0},
            ]}
        ],
    }


def echo_judge(messages, params):
    return f"{params['model']}|{messages[-1]['content']}"


def boom_judge(messages, params):
    raise ValueError("judge bug")


def client(srv, **kw):
    opts = dict(model="test-model", base_url=srv.base_url, api_key_env=None, cache_path=None, max_retries=3,
                timeout=5, backoff_base=0.01, backoff_max=0.05)
    opts.update(kw)
    return make_client("openai", **opts)


def run(coro):
    return asyncio.run(coro)


# ---- success, retries, permanent errors --------------------------------------------------------------------


def test_success_usage_and_cost():
    with start_llm_server() as srv:
        c = client(srv, prices={"test-model": {"prompt": 1.0, "completion": 2.0}})
        out = run(c.complete(MSG, SamplingParams(max_tokens=32)))
        st = srv.stats()
    assert out.text and not out.cached and out.model == "test-model"
    assert st["requests"] == 1 and st["by_status"] == {"200": 1}
    prompt_chars = sum(len(m.content) for m in MSG)
    assert out.usage.prompt_tokens == -(-prompt_chars // 4) and out.usage.completion_tokens == -(-len(out.text) // 4)
    assert out.usage.calls == 1 and out.usage.estimated_calls == 0
    expected = (out.usage.prompt_tokens * 1.0 + out.usage.completion_tokens * 2.0) / 1e6
    assert out.usage.cost_usd == pytest.approx(expected)
    assert c.usage_total.as_dict() == out.usage.as_dict()


def test_retries_then_success():
    with start_llm_server(fail_first=2) as srv:
        out = run(client(srv).complete(MSG))
        st = srv.stats()
    assert st["requests"] == 3 and st["by_status"] == {"500": 2, "200": 1}
    assert out.text and out.usage.calls == 1


def test_408_counts_as_timeout_and_is_retried():
    with start_llm_server(fail_first=1, fail_status=408) as srv:
        run(client(srv).complete(MSG))
        assert srv.stats()["by_status"] == {"408": 1, "200": 1}


def test_429_retry_after_is_honoured():
    with start_llm_server(fail_first=1, fail_status=429, retry_after=1) as srv:
        t0 = time.monotonic()
        out = run(client(srv).complete(MSG))
        elapsed = time.monotonic() - t0
        st = srv.stats()
    assert out.text and st["requests"] == 2 and st["by_status"] == {"429": 1, "200": 1}
    assert elapsed >= 1.0  # backoff alone would be <= 0.05 s


def test_random_429s_with_seeded_server_eventually_succeed():
    with start_llm_server(fail_429=0.5, retry_after=0.05, seed=3) as srv:
        c = client(srv, max_retries=10)
        outs = run(_gather(c, 6))
        st = srv.stats()
    assert len(outs) == 6 and st["by_status"]["200"] == 6 and st["requests"] == 6 + st["by_status"].get("429", 0)


async def _gather(c, n, params=None):
    return await asyncio.gather(*[c.complete([ChatMessage("user", f"q{i}")], params) for i in range(n)])


def _backend(seed, **kw):
    opts = dict(model="m", base_url="http://127.0.0.1:9/v1", api_key_env=None, backoff_base=1.0, backoff_max=8.0,
                max_retry_after=5.0, rng=random.Random(seed))
    return OpenAIBackend(**{**opts, **kw})


def test_backoff_grows_exponentially_with_full_jitter_and_caps():
    b = _backend(0)
    n = 400
    delays = {a: [b.backoff_delay(a) for _ in range(n)] for a in range(7)}
    for a, ds in delays.items():
        bound = min(8.0, 1.0 * 2**a)  # base * 2^attempt, capped by backoff_max
        assert all(0.0 <= d <= bound for d in ds), a
        assert max(ds) > 0.9 * bound and min(ds) < 0.1 * bound  # full jitter: the whole range is used
        assert len(set(ds)) == n  # jittered: no two equal
        assert sum(ds) / n == pytest.approx(bound / 2, rel=0.15)  # uniform on [0, bound]
    means = [sum(delays[a]) / n for a in range(4)]
    assert all(1.6 < b2 / b1 < 2.4 for b1, b2 in zip(means, means[1:]))  # doubles per attempt until the cap
    # the same seed gives the same schedule; another seed another one
    assert [_backend(1).backoff_delay(3) for _ in range(3)] == [_backend(1).backoff_delay(3) for _ in range(3)]
    assert _backend(1).backoff_delay(3) != _backend(2).backoff_delay(3)


def test_backoff_honours_retry_after_up_to_max_retry_after():
    b = _backend(0)
    for a in range(3):  # jitter bound 1, 2, 4 s; the server asks for 3 s
        assert all(3.0 <= b.backoff_delay(a, 3.0) <= max(3.0, 2.0**a) for _ in range(50))
    assert all(b.backoff_delay(0, 3600.0) == 5.0 for _ in range(20))  # capped by max_retry_after
    assert b.backoff_delay(0, 0.0) <= 1.0  # "retry at once" leaves the jitter


def test_backoff_schedule_is_what_complete_sleeps(caplog):
    """The waits between real retries are the seeded schedule (read from the retry log lines), and really waited."""
    with start_llm_server(fail_first=3, fail_status=503) as srv:
        b = OpenAIBackend(model="m", base_url=srv.base_url, api_key_env=None, max_retries=3, backoff_base=0.2,
                          backoff_max=0.5, rng=random.Random(7))
        with caplog.at_level("INFO", logger="autointerp.llm.openai_backend"):
            t0 = time.monotonic()
            run(b.complete(MSG))
            elapsed = time.monotonic() - t0
        assert srv.stats()["by_status"] == {"503": 3, "200": 1}
    slept = [r.args[-1] for r in caplog.records if "retry" in r.msg]
    ref = OpenAIBackend(model="m", base_url=srv.base_url, api_key_env=None, backoff_base=0.2, backoff_max=0.5,
                        rng=random.Random(7))
    assert slept == [ref.backoff_delay(a) for a in range(3)]
    assert sum(slept) > 0.2 and elapsed >= sum(slept)  # a lower bound: a busy machine cannot make it fail


def test_no_retry_on_400():
    with start_llm_server(fail_first=1, fail_status=400) as srv:
        with pytest.raises(PermanentLLMError, match="HTTP 400"):
            run(client(srv).complete(MSG))
        assert srv.stats()["requests"] == 1
    with start_llm_server() as srv:  # a request the server itself rejects
        with pytest.raises(PermanentLLMError, match="messages"):
            run(client(srv).complete([]))
        assert srv.stats()["by_status"] == {"400": 1}


def test_bad_credentials_401(monkeypatch):
    monkeypatch.setenv("AUTOINTERP_TEST_KEY", "wrong")
    with start_llm_server(api_key="sekrit") as srv:
        with pytest.raises(PermanentLLMError) as ei:
            run(client(srv, api_key_env="AUTOINTERP_TEST_KEY").complete(MSG))
        assert srv.stats()["requests"] == 1
        msg = str(ei.value)
        assert "bad credentials" in msg and srv.base_url in msg and "AUTOINTERP_TEST_KEY" in msg
        monkeypatch.setenv("AUTOINTERP_TEST_KEY", "sekrit")
        assert run(client(srv, api_key_env="AUTOINTERP_TEST_KEY").complete(MSG)).text


def test_missing_key_is_named(monkeypatch):
    monkeypatch.delenv("AUTOINTERP_TEST_KEY", raising=False)
    with start_llm_server(api_key="sekrit") as srv:
        with pytest.raises(PermanentLLMError, match="AUTOINTERP_TEST_KEY is not set"):
            run(client(srv, api_key_env="AUTOINTERP_TEST_KEY").complete(MSG))


def test_openai_without_key_fails_at_construction(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(PermanentLLMError, match="OPENAI_API_KEY"):
        make_client("openai", model="gpt-4o-mini", cache_path=None)


def test_unknown_model_404():
    with start_llm_server(models=["known"]) as srv:
        with pytest.raises(PermanentLLMError) as ei:
            run(client(srv, model="nope").complete(MSG))
        assert "'nope'" in str(ei.value) and srv.base_url in str(ei.value)
        assert srv.stats()["requests"] == 1
        assert run(client(srv, model="known").complete(MSG)).text


def test_timeouts_are_retried_then_llm_error():
    with start_llm_server(timeout_rate=1.0, hang_s=5) as srv:
        t0 = time.monotonic()
        with pytest.raises(LLMError, match="timed out") as ei:
            run(client(srv, timeout=0.3, max_retries=2).complete(MSG))
        assert not isinstance(ei.value, PermanentLLMError)
        assert time.monotonic() - t0 < 8  # 3 x 0.3 s timeouts + tiny backoff, loose for loaded CI
        assert srv.stats()["requests"] == 3


def test_malformed_bodies_are_retried():
    # seed 7: the server's first two draws are < 0.5 (malformed: truncated JSON, then no "choices"), the third not
    with start_llm_server(malformed_rate=0.5, seed=7) as srv:
        out = run(client(srv).complete(MSG))
        assert out.text and srv.stats()["requests"] == 3
    with start_llm_server(malformed_rate=1.0) as srv:
        with pytest.raises(LLMError, match="malformed"):
            run(client(srv, max_retries=1).complete(MSG))
        assert srv.stats()["requests"] == 2


def test_connection_refused_is_retried():
    srv = start_llm_server()
    url = srv.base_url
    srv.stop()
    c = make_client("openai", model="m", base_url=url, api_key_env=None, cache_path=None, max_retries=1,
                    backoff_base=0.01, timeout=2)
    with pytest.raises(LLMError, match="connection"):
        run(c.complete(MSG))


# ---- concurrency -------------------------------------------------------------------------------------------


def test_concurrency_limit_shared_per_endpoint():
    with start_llm_server(latency_ms=150) as srv:
        a = client(srv, concurrency=3)
        b = client(srv, concurrency=10)  # same endpoint: the first registered limit (3) applies

        async def both():
            return await asyncio.gather(_gather(a, 6), _gather(b, 6))

        outs = run(both())
        st = srv.stats()
    assert sum(len(o) for o in outs) == 12 and st["requests"] == 12
    assert st["max_in_flight"] == 3


def test_client_survives_several_event_loops():
    with start_llm_server() as srv:
        c = client(srv)
        for _ in range(2):  # per-loop HTTP client and semaphore
            assert run(c.complete(MSG)).text
        assert srv.stats()["requests"] == 2


# ---- cache -------------------------------------------------------------------------------------------------


def test_cache_second_call_is_free(tmp_path):
    path = tmp_path / "cache.sqlite"
    params = SamplingParams(max_tokens=8, logprobs=True, top_logprobs=2)
    with start_llm_server(judge=lp_judge) as srv:
        c = client(srv, cache_path=path, prices={"test-model": [1.0, 1.0]})
        first = run(c.complete(MSG, params))
        second = run(c.complete(MSG, params))
        other_process = client(srv, cache_path=path)  # a fresh client on the same file
        third = run(other_process.complete(MSG, params))
        assert srv.stats()["requests"] == 1
    assert first.usage.cost_usd > 0 and not first.cached
    for hit in (second, third):
        assert hit.cached and hit.text == first.text and hit.logprobs == first.logprobs
        assert hit.usage.calls == 0 and hit.usage.cached_calls == 1 and hit.usage.cost_usd == 0
        assert hit.usage.prompt_tokens == 0
        assert hit.usage.cached_prompt_tokens == first.usage.prompt_tokens
    assert c.usage_total.calls == 1 and c.usage_total.cached_calls == 1
    assert c.usage_total.cost_usd == pytest.approx(first.usage.cost_usd)


def test_closing_the_client_closes_its_cache_and_a_later_loop_reopens_it(tmp_path):
    with start_llm_server() as srv:
        c = client(srv, cache_path=tmp_path / "cache.sqlite")

        async def once():
            async with c:
                return await c.complete(MSG)
        first = run(once())
        assert c.cache._conn is None  # closed with the client: no connection left open per finished job
        again = run(once())  # the next event loop: the cache reopens and answers
        assert again.cached and again.text == first.text and srv.stats()["requests"] == 1


def test_cache_keys_and_failures(tmp_path):
    path = tmp_path / "cache.sqlite"
    with start_llm_server(fail_first=1, fail_status=400) as srv:
        c = client(srv, cache_path=path)
        with pytest.raises(PermanentLLMError):
            run(c.complete(MSG))  # failures are not cached
        run(c.complete(MSG))
        run(c.complete(MSG))
        assert srv.stats()["requests"] == 2
        run(c.complete(MSG, SamplingParams(max_tokens=7)))  # other params, other key
        run(c.complete(MSG[1:]))  # other messages
        run(client(srv, cache_path=path, model="other").complete(MSG))  # other model
        assert srv.stats()["requests"] == 5
        unseeded = SamplingParams(temperature=0.7, seed=None)  # meant to differ: never cached
        run(c.complete(MSG, unseeded))
        run(c.complete(MSG, unseeded))
        assert srv.stats()["requests"] == 7
    assert len(c.cache) == 4


def test_cache_key_includes_endpoint_and_extra_body(tmp_path):
    """One model name on two servers, or with other extra request fields, never shares answers."""
    path = tmp_path / "cache.sqlite"
    with start_llm_server(judge=echo_judge) as a, start_llm_server(judge=echo_judge) as b:
        first = run(client(a, cache_path=path).complete(MSG))
        assert run(client(a, cache_path=path).complete(MSG)).cached  # same server: a hit
        other = run(client(b, cache_path=path).complete(MSG))
        assert not other.cached and b.stats()["requests"] == 1
        guided = run(client(a, cache_path=path, extra_body={"guided_choice": ["x"]}).complete(MSG))
        assert not guided.cached and a.stats()["requests"] == 2
        assert run(client(a, cache_path=path, extra_body={"guided_choice": ["x"]}).complete(MSG)).cached
        assert a.stats()["requests"] == 2 and first.text == other.text
    from autointerp.llm import cache_key

    k = cache_key("m", MSG, SamplingParams())
    assert k != cache_key("m", MSG, SamplingParams(), endpoint="http://a/v1")
    assert cache_key("m", MSG, SamplingParams(), endpoint="http://a/v1") != \
        cache_key("m", MSG, SamplingParams(), endpoint="http://b/v1")
    assert cache_key("m", MSG, SamplingParams(), extra_body={"x": 1}) != cache_key("m", MSG, SamplingParams())


def test_cache_path_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("AUTOINTERP_LLM_CACHE", "off")
    assert resolve_cache_path() is None
    monkeypatch.setenv("AUTOINTERP_LLM_CACHE", str(tmp_path / "x.sqlite"))
    assert resolve_cache_path() == tmp_path / "x.sqlite"
    monkeypatch.delenv("AUTOINTERP_LLM_CACHE")
    assert resolve_cache_path().name == "llm_cache.sqlite"
    monkeypatch.setenv("AUTOINTERP_CACHE", str(tmp_path / "root"))  # the README: under the cache root
    assert resolve_cache_path() == tmp_path / "root" / "llm_cache.sqlite"
    assert resolve_cache_path(None) is None


# ---- logprobs, usage fallbacks -----------------------------------------------------------------------------


def test_logprobs_parsed():
    with start_llm_server(judge=lp_judge) as srv:
        c = client(srv)
        out = run(c.complete(MSG, SamplingParams(max_tokens=1, logprobs=True, top_logprobs=2)))
        plain = run(c.complete(MSG))
    assert out.text == "Yes" and len(out.logprobs) == 1
    lp = out.logprobs[0]
    assert lp.token == "Yes" and lp.logprob == pytest.approx(-0.1)
    assert lp.top == {"Yes": pytest.approx(-0.1), "No": pytest.approx(-2.4)}  # server trims to top_logprobs
    assert plain.logprobs is None and c.supports_logprobs


def test_server_without_logprobs_is_learned():
    with start_llm_server(logprobs=False) as srv:
        c = client(srv)
        assert c.supports_logprobs  # optimistic until a response says otherwise
        assert run(c.backend.probe_logprobs()) is False
        assert not c.supports_logprobs
        out = run(c.complete(MSG, SamplingParams(logprobs=True)))
        assert out.logprobs is None
    assert client(srv, supports_logprobs=False).supports_logprobs is False


def test_missing_usage_is_estimated():
    with start_llm_server(usage=False) as srv:
        out = run(client(srv).complete(MSG))
    # the server sent no usage: ~4 characters per token, counted on what was sent and received
    assert out.usage.estimated_calls == 1
    assert out.usage.prompt_tokens == math.ceil(len("".join(m.content for m in MSG)) / 4)
    assert out.usage.completion_tokens == math.ceil(len(out.text) / 4) > 0


def test_judge_sees_messages_and_params():
    with start_llm_server(judge="test_llm_client:echo_judge") as srv:
        out = run(client(srv, model="m1").complete([ChatMessage("user", "ping")]))
    assert out.text == "m1|ping"


def test_judge_exception_is_a_500():
    with start_llm_server(judge=boom_judge) as srv:
        with pytest.raises(LLMError, match="judge raised ValueError"):
            run(client(srv, max_retries=0).complete(MSG))
        assert srv.stats()["judge_errors"] == 1
        assert "judge bug" in srv.stderr()


def test_script_list_and_regex(tmp_path):
    with start_llm_server(script=["one", {"text": "two"}]) as srv:
        c = client(srv, max_retries=0)
        assert [run(c.complete([ChatMessage("user", q)])).text for q in "ab"] == ["one", "two"]
        with pytest.raises(LLMError, match="script exhausted"):
            run(c.complete(MSG))
    f = tmp_path / "s.json"
    f.write_text(json.dumps({"(?i)explain": "an explanation", "score": "0.5"}))
    with start_llm_server(script=str(f)) as srv:
        c = client(srv)
        assert run(c.complete([ChatMessage("user", "Please EXPLAIN this")])).text == "an explanation"
        assert run(c.complete([ChatMessage("user", "score it")])).text == "0.5"
        assert "test server" in run(c.complete([ChatMessage("user", "other")])).text


def test_server_stats_reset_and_models():
    import urllib.request

    with start_llm_server(models="a,b", latency_ms=10) as srv:
        run(client(srv, model="a").complete(MSG))
        st = srv.stats()
        assert st["per_model"] == {"a": 1} and st["prompt_chars"] == sum(len(m.content) for m in MSG)
        srv.reset_stats()
        assert srv.stats()["requests"] == 0
        with urllib.request.urlopen(srv.base_url + "/models") as r:
            assert [m["id"] for m in json.loads(r.read())["data"]] == ["a", "b"]


def test_server_start_failure_shows_stderr():
    with pytest.raises(RuntimeError, match="No module named"):
        start_llm_server(judge="no_such_module_xyz:f")


# ---- pricing, specs, usage scopes, retry-after -------------------------------------------------------------


def test_price_table_math_and_lookup(tmp_path):
    t = PriceTable({"m": {"prompt": 1.0, "completion": 2.0}})
    assert t.cost("m", 1_000_000, 500_000) == pytest.approx(2.0)
    assert t.cost("gpt-4o-mini", 2_000_000, 1_000_000) == pytest.approx(2 * 0.15 + 0.60)
    assert t.lookup("gpt-4o-mini-2024-07-18") == t.lookup("gpt-4o-mini")  # longest prefix, not gpt-4o
    assert t.lookup("openai/gpt-4o") == t.lookup("gpt-4o")
    assert t.cost("unknown-model", 10**6, 10**6) == 0.0
    assert t.cost("builtin:smollm2", 10**6, 10**6) == 0.0
    (tmp_path / "p.json").write_text(json.dumps({"gpt-4o": [1, 1]}))
    (tmp_path / "p.toml").write_text('[prices."my/model"]\nprompt = 3\ncompletion = 4\n')
    assert PriceTable.load(tmp_path / "p.json").cost("gpt-4o", 10**6, 0) == pytest.approx(1.0)
    assert PriceTable.load(tmp_path / "p.toml").cost("my/model", 10**6, 10**6) == pytest.approx(7.0)
    with pytest.raises(ConfigError, match="bad"):
        PriceTable({"bad": "cheap"})


def test_parse_spec():
    assert parse_spec("openai:gpt-4o-mini") == {"backend": "openai", "model": "gpt-4o-mini", "base_url": None}
    assert parse_spec("openai:llama3.1:8b@http://localhost:11434/v1") == {
        "backend": "openai", "model": "llama3.1:8b", "base_url": "http://localhost:11434/v1"}
    assert parse_spec("openai:Qwen/Qwen2.5-7B@https://h/v1")["model"] == "Qwen/Qwen2.5-7B"
    assert parse_spec("local") == {"backend": "local", "model": None, "base_url": None}
    assert parse_spec("local:builtin:smollm2")["model"] == "builtin:smollm2"
    for bad in ("openai:", "vllm:x", ""):
        with pytest.raises(ConfigError):
            parse_spec(bad)


def test_client_from_spec_against_server():
    with start_llm_server(models=["judge"]) as srv:
        c = client_from_spec(f"openai:judge@{srv.base_url}", api_key_env=None, cache_path=None)
        assert c.model == "judge" and run(c.complete(MSG)).text


def test_usage_scopes_and_meter():
    with start_llm_server() as srv:
        meter = UsageMeter()
        a, b = client(srv, meter=meter), client(srv, meter=meter, model="other")

        async def job():
            async with usage_scope() as job_u:
                for latent in (1, 2):
                    with meter.scope(f"latent-{latent}"):
                        # tasks started inside the scope count into it
                        await asyncio.gather(a.complete(MSG), b.complete([ChatMessage("user", str(latent))]))
                await a.complete(MSG[1:])  # outside any latent scope
            return job_u

        job_u = run(job())
    assert meter.by_scope["latent-1"].calls == 2 and meter.by_scope["latent-2"].calls == 2
    assert job_u.calls == 5 and meter.total.calls == 5
    assert a.usage_total.calls == 3 and b.usage_total.calls == 2
    assert job_u.prompt_tokens == meter.total.prompt_tokens


def test_usage_dict_roundtrip():
    u = Usage(1, 2, 0.5, 3, 4, 5, 6, 7)
    assert Usage.from_dict(u.as_dict()) == u
    assert Usage.from_dict({"calls": 1, "future_field": 9}) == Usage(calls=1)


def test_parse_retry_after():
    assert parse_retry_after({"retry-after": "2"}) == 2.0
    assert parse_retry_after({"retry-after": "0.5"}) == 0.5
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert parse_retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:10 GMT"}, now=1445412480.0) == pytest.approx(10.0)
    assert parse_retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, now=1445412490.0) == 0.0
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({}) is None


def test_context_length_is_an_item_error_not_permanent():
    with start_llm_server(max_prompt_chars=50) as srv:
        c = client(srv)
        with pytest.raises(LLMError, match="prompt too long") as ei:
            run(c.complete([ChatMessage("user", "x" * 200)]))
        assert not isinstance(ei.value, PermanentLLMError)
        assert srv.stats()["requests"] == 1  # not retried
        assert run(c.complete([ChatMessage("user", "short")])).text  # the job goes on


def test_switches_to_max_completion_tokens_once():
    with start_llm_server(reject_max_tokens=True) as srv:
        c = client(srv)
        assert run(c.complete(MSG)).text
        assert run(c.complete(MSG[1:])).text
        assert srv.stats()["by_status"] == {"400": 1, "200": 2}


def test_metered_client_is_an_llm_client():
    from autointerp.llm import LLMClient

    with start_llm_server(script=["scripted answer"]) as srv:
        c = client(srv)
        assert isinstance(c, LLMClient) and c.model == "test-model"
        out = run(c.complete(MSG))  # what every explainer and scorer relies on: text, model, usage
    assert out.text == "scripted answer" and out.model == "test-model" and out.usage.calls == 1


def test_cache_shared_between_connections(tmp_path):
    """Two ResponseCache objects on one file stand in for two processes (WAL, separate connections)."""
    from autointerp.llm import Completion, ResponseCache, cache_key

    a, b = ResponseCache(tmp_path / "c.sqlite"), ResponseCache(tmp_path / "c.sqlite")
    for i in range(20):
        key = cache_key("m", [ChatMessage("user", str(i))], SamplingParams())
        (a if i % 2 else b).put(key, Completion(str(i), Usage(prompt_tokens=i, calls=1), "m"))
    assert len(a) == len(b) == 20
    hit = b.get(cache_key("m", [ChatMessage("user", "7")], SamplingParams()))
    assert hit.text == "7" and hit.cached and hit.usage.cached_prompt_tokens == 7 and hit.logprobs is None
