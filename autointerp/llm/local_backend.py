"""Backend `local`: a transformers causal LM in this process (default: builtin:smollm2, SmolLM2-135M-Instruct).

Generation runs in a worker thread (asyncio.to_thread) so the event loop stays responsive; one lock per loaded
model serializes generate() calls (a model is shared by every LocalBackend of the same spec/device/dtype, so an
explainer and a judge on the same model load it once). Requests are not batched together: batching pads
prompts, which changes greedy outputs slightly with what a prompt happens to share a batch with, and we want a
prompt's answer to be reproducible.

temperature 0 -> greedy; otherwise plain temperature sampling (no top-k/top-p) seeded with params.seed.
Logprobs are those of the model's own distribution (raw logits, before temperature), like vLLM reports them.

A request with `answer_bits = n` (the detection and fuzzing judges) is decoded under a grammar: the answer is
exactly "[b, b, …]" with n entries, each chosen between the "0" and "1" tokens by the model's own logits (the
brackets and separators are forced). A small judge that would wander off the format still gives its judgement on
every example, with P(1) per entry; vLLM's guided decoding does the same on a server.

A request with `answer_prefix` (the explainers: "[EXPLANATION]:") gets its turn prefilled with that text: the model
writes only the rest of that line, to the end of its first sentence (explanations are one sentence). A 135M explainer asked for reasoning and then a
marked final line mostly answered "I'm ready to help. What's your question?"; prefilled, it writes an explanation.

On a CPU most of the model's Linear layers run int8 (torch's dynamic quantization: int8 weights, activations
quantized per call) unless $AUTOINTERP_LOCAL_QUANTIZE is `none`; see docs/benchmarks.md for the speed and the
distance from float32. The answers differ from float32's, so the setting is part of the model's identity
(`local:…+int8`), of the response cache's key, and recorded in every result's model.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
import threading
from dataclasses import dataclass

from ..errors import ConfigError
from .base import ChatMessage, Completion, LLMError, PermanentLLMError, SamplingParams, TokenLogprob, Usage

DEFAULT_LOCAL_MODEL = "builtin:smollm2"
QUANTIZE_ENV = "AUTOINTERP_LOCAL_QUANTIZE"

log = logging.getLogger(__name__)


def local_quantization() -> str:
    """'int8' (the default: on a CPU, Linear layers run dynamically quantized) or 'none', from $AUTOINTERP_LOCAL_QUANTIZE."""
    v = (os.environ.get(QUANTIZE_ENV) or "int8").strip().lower()
    if v not in ("int8", "none"):
        raise ConfigError(f"${QUANTIZE_ENV}={v!r}: expected 'int8' or 'none'")
    return v


def quantized_name(name: str, quantize: str) -> str:
    """How results name a model run with `quantize`: "builtin:smollm2+int8"; unchanged for 'none'."""
    return name if quantize == "none" else f"{name}+{quantize}"


@dataclass
class _Loaded:
    model: object
    tokenizer: object
    lock: threading.Lock
    stop_ids: list[int]
    max_len: int | None
    bits: "_BitsGrammar | None" = None
    name: str = ""  # what results record as the model: the spec, "+int8" when quantized
    breaks: list[int] | None = None  # token ids holding a line break (`_break_ids`)


@dataclass(frozen=True)
class _BitsGrammar:
    """Token ids for writing "[b, b, …]": forced before the first entry, the two choices of an entry, forced
    between entries, forced at the end."""

    open: tuple[int, ...]
    zero: int
    one: int
    sep: tuple[int, ...]
    close: tuple[int, ...]

    @classmethod
    def of(cls, tok) -> "_BitsGrammar | None":
        """None when the tokenizer spells the list in a way this cannot follow (a digit merged with its
        neighbours): such a model answers in free text instead."""
        enc = lambda s: tuple(tok.encode(s, add_special_tokens=False))  # noqa: E731
        first0, first1 = enc("[0"), enc("[1")
        two0, two1, closed = enc("[0, 0"), enc("[0, 1"), enc("[0]")
        n = len(first0)
        if (n < 2 or len(first1) != n or first0[:-1] != first1[:-1] or first0[-1] == first1[-1]
                or len(two0) != len(two1) or two0[:-1] != two1[:-1] or two0[:n] != first0
                or (two0[-1], two1[-1]) != (first0[-1], first1[-1]) or closed[:n] != first0 or len(closed) == n):
            return None
        return cls(first0[:-1], first0[-1], first1[-1], two0[n:-1], closed[n:])


_LOADED: dict[tuple, _Loaded] = {}
_LOAD_LOCK = threading.Lock()


# Linear layers left in float32: their inputs carry the outlier features that per-tensor int8 activations clip.
# On SmolLM2-135M, next-token KL from float32 is 0.57 nats with every layer int8 and 0.066 without these two.
_FLOAT_LAYERS = ("o_proj", "down_proj")


def _quantized(model, spec: str):
    """`model` with int8 dynamic quantization of its Linear layers (but `_FLOAT_LAYERS`), or None where it cannot run
    (not on a CPU, not float32, or a torch without the kernels): the caller keeps the float model."""
    import warnings

    import torch

    if model.device.type != "cpu" or model.dtype != torch.float32:
        return None
    from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

    layers = {n: default_dynamic_qconfig for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and not n.endswith(_FLOAT_LAYERS)}
    try:
        with warnings.catch_warnings():  # torch deprecates the quantized-tensor API in favour of torchao
            warnings.simplefilter("ignore")
            return quantize_dynamic(model, layers, dtype=torch.qint8)
    except (AttributeError, RuntimeError, NotImplementedError) as e:
        log.warning("local model %s: int8 quantization unavailable (%s); running float32", spec, e)
        return None


def _load(spec: str, device: str | None, dtype, quantize: str = "none") -> _Loaded:
    key = (spec, device, str(dtype), quantize)
    with _LOAD_LOCK:
        if key in _LOADED:
            return _LOADED[key]
        from ..hf_loading import load_causal_lm

        try:
            model, tok = load_causal_lm(spec, device=device, dtype=dtype)
        except ConfigError as e:
            raise PermanentLLMError(f"local model {spec!r}: {e}") from e
        quantized = _quantized(model, spec) if quantize == "int8" else None
        model = quantized if quantized is not None else model
        stop = set()
        gen_eos = getattr(model.generation_config, "eos_token_id", None)
        stop.update(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
        # Chat models end a turn with an end-of-turn token that GGUF metadata may not declare as eos.
        for t in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", tok.eos_token):
            tid = tok.convert_tokens_to_ids(t) if t else None
            if isinstance(tid, int) and tid != tok.unk_token_id:
                stop.add(tid)
        max_len = getattr(model.config, "max_position_embeddings", None)
        loaded = _Loaded(model, tok, threading.Lock(), sorted(stop), max_len, _BitsGrammar.of(tok),
                         quantized_name(spec, "int8" if quantized is not None else "none"))
        _LOADED[key] = loaded
        return loaded


_SENTENCE_END = re.compile(r"\n|(?<=[.!?])\s")


def _first_sentence_end(text: str) -> int | None:
    """Where the first line or sentence of `text` (leading whitespace skipped) ends, or None."""
    body = text.lstrip()
    m = _SENTENCE_END.search(body)
    return None if m is None else len(text) - len(body) + m.start()


class _LineEnd:
    """A generate() stopping criterion: the generated text has ended its first line or sentence."""

    def __init__(self, tok):
        self.tok, self.n_in = tok, None

    def __call__(self, input_ids, scores, **kw):
        import torch

        if self.n_in is None:
            self.n_in = input_ids.shape[1] - 1  # first call: one token generated
        done = _first_sentence_end(self.tok.decode(input_ids[0, self.n_in:])) is not None
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class _SameLine:
    """A generate() logits processor: no line break before the answer has visible text, so the prefilled line gets
    its answer on that line (an int8 135M model otherwise often opened with a blank line and wandered off)."""

    def __init__(self, tok, breaks: list[int], n_in: int):
        self.tok, self.breaks, self.n_in = tok, breaks, n_in

    def __call__(self, input_ids, scores):
        if not self.tok.decode(input_ids[0, self.n_in:]).strip():
            scores[:, self.breaks] = float("-inf")
        return scores


def _break_ids(lm: "_Loaded") -> list[int]:
    """Token ids whose text holds a line break (computed once per loaded model)."""
    if lm.breaks is None:
        tok = lm.tokenizer
        lm.breaks = [i for i in range(len(tok)) if "\n" in tok.decode([i])]
    return lm.breaks


class LocalBackend:
    cost_free = True  # no per-token price

    def __init__(self, model: str = DEFAULT_LOCAL_MODEL, device: str | None = None, dtype=None,
                 quantize: str | None = None):
        self.model = model or DEFAULT_LOCAL_MODEL
        self.device = device
        self.dtype = dtype
        self.quantize = quantize or local_quantization()
        # what results record, and what the response cache keys on: a quantized model's answers are its own
        self.model_name = quantized_name(self.model, self.quantize)

    @property
    def supports_logprobs(self) -> bool:
        return True

    async def complete(self, messages: list[ChatMessage], params: SamplingParams | None = None) -> Completion:
        params = params or SamplingParams()
        return await asyncio.to_thread(self._complete_sync, messages, params)

    def load(self) -> None:
        """Load the model now (otherwise the first complete() does)."""
        self._lm()

    def _lm(self) -> _Loaded:
        return _load(self.model, self.device, self.dtype, self.quantize)

    async def aclose(self) -> None:
        pass

    # ---- worker thread ------------------------------------------------------------------------------------

    def _encode(self, tok, messages: list[ChatMessage]):
        msgs = [{"role": m.role, "content": m.content} for m in messages]
        try:
            return tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        except Exception as e:  # jinja TemplateError: some templates (e.g. Gemma) reject a system role
            if not msgs or msgs[0]["role"] != "system" or len(msgs) < 2:
                raise PermanentLLMError(f"local model {self.model!r}: chat template failed: {e}") from e
            merged = [{"role": msgs[1]["role"], "content": msgs[0]["content"] + "\n\n" + msgs[1]["content"]}]
            return tok.apply_chat_template(
                merged + msgs[2:], add_generation_prompt=True, return_tensors="pt", return_dict=True
            )

    def _complete_sync(self, messages: list[ChatMessage], params: SamplingParams) -> Completion:
        import torch
        from transformers import GenerationConfig

        lm = self._lm()
        model, tok = lm.model, lm.tokenizer
        enc = self._encode(tok, messages)
        prefix = params.answer_prefix if params.answer_bits <= 0 else ""
        if prefix:  # the answer's start, written into the model's own turn
            ids = torch.tensor([tok.encode(prefix, add_special_tokens=False)], dtype=enc["input_ids"].dtype)
            enc["input_ids"] = torch.cat([enc["input_ids"], ids], 1)
            enc["attention_mask"] = torch.cat([enc["attention_mask"], torch.ones_like(ids)], 1)
        enc = enc.to(model.device)
        n_in = int(enc["input_ids"].shape[1])
        max_new = params.max_tokens
        if lm.max_len:
            if n_in >= lm.max_len:
                raise LLMError(f"prompt too long for {self.model!r}: {n_in} tokens, context is {lm.max_len}")
            max_new = min(max_new, lm.max_len - n_in)
        sample = params.temperature > 0
        if params.answer_bits > 0 and lm.bits is not None:
            return self._complete_bits(lm, enc, n_in, params)
        cfg = GenerationConfig(
            max_new_tokens=max(1, max_new),
            do_sample=sample,
            temperature=params.temperature if sample else None,
            top_k=0 if sample else None,
            top_p=1.0 if sample else None,
            eos_token_id=lm.stop_ids or None,
            bos_token_id=getattr(model.generation_config, "bos_token_id", None),
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else (lm.stop_ids or [0])[0],
        )
        want_lp = params.logprobs
        with lm.lock, torch.inference_mode():
            if sample:  # global RNG, safe under the lock
                torch.manual_seed(params.seed if params.seed is not None else random.randrange(2**31))
            line = {"stopping_criteria": [_LineEnd(tok)],
                    "logits_processor": [_SameLine(tok, _break_ids(lm), n_in)]} if prefix else {}
            out = model.generate(**enc, generation_config=cfg, output_logits=want_lp, return_dict_in_generate=True,
                                 **line)

        gen = out.sequences[0, n_in:].tolist()
        stop = set(lm.stop_ids)
        end = next((i for i, t in enumerate(gen) if t in stop), len(gen))
        n_generated = min(end + 1, len(gen))  # the end-of-turn token was generated too
        text = tok.decode(gen[:end], skip_special_tokens=True)

        logprobs = None
        if want_lp:
            logprobs = []
            k = max(0, params.top_logprobs)
            for i in range(end):
                lp = torch.log_softmax(out.logits[i][0].float(), dim=-1)
                top = {}
                if k:
                    vals, ids = lp.topk(k)
                    for v, j in zip(vals.tolist(), ids.tolist()):
                        top.setdefault(tok.decode([j]), v)  # distinct ids can decode alike; keep the likelier
                logprobs.append(TokenLogprob(token=tok.decode([gen[i]]), logprob=float(lp[gen[i]]), top=top))
        usage = Usage(prompt_tokens=n_in, completion_tokens=n_generated, calls=1)
        if prefix:  # the rest of the prefilled line, to its first sentence's end (logprobs: generated tokens)
            cut = _first_sentence_end(text)
            text = prefix + (text if cut is None else text[:cut])
        return Completion(text=text, usage=usage, model=lm.name, logprobs=logprobs)

    def _complete_bits(self, lm: _Loaded, enc, n_in: int, params: SamplingParams) -> Completion:
        """The answer "[b, …]" under the grammar: n + 1 short forward passes on the KV cache after the prompt."""
        import torch

        model, tok, g = lm.model, lm.tokenizer, lm.bits
        if lm.max_len and n_in + 4 * params.answer_bits + 4 >= lm.max_len:
            raise LLMError(f"prompt too long for {self.model!r}: {n_in} tokens, context is {lm.max_len}")
        k = max(0, params.top_logprobs)
        names = {g.zero: tok.decode([g.zero]), g.one: tok.decode([g.one])}
        gen = torch.Generator().manual_seed(params.seed if params.seed is not None else random.randrange(2**31))

        def lp_entry(lp, tid: int, choice: bool) -> TokenLogprob:
            top = {}
            if k:
                vals, ids = lp.topk(k)
                for v, j in zip(vals.tolist(), ids.tolist()):
                    top.setdefault(tok.decode([j]), v)
            if choice:  # both alternatives always reported: P(1) of the entry is read from them
                top.update({names[g.zero]: float(lp[g.zero]), names[g.one]: float(lp[g.one])})
            return TokenLogprob(token=tok.decode([tid]), logprob=float(lp[tid]), top=top)

        out_tokens: list[TokenLogprob] = []
        with lm.lock, torch.inference_mode():
            out = model(**enc, use_cache=True, logits_to_keep=1)  # the prompt: only its last logits are read
            past, last = out.past_key_values, out.logits[0, -1]

            def feed(ids: tuple[int, ...], choice: bool = False):
                nonlocal past, last
                if not ids:
                    return
                logits = [last]
                out = model(input_ids=torch.tensor([ids], device=model.device), past_key_values=past, use_cache=True)
                logits += list(out.logits[0, :-1])
                for i, (tid, lg) in enumerate(zip(ids, logits)):
                    out_tokens.append(lp_entry(torch.log_softmax(lg.float(), -1), tid, choice and i == 0))
                past, last = out.past_key_values, out.logits[0, -1]

            # One step per entry (its digit and the separator after it). Jacobi passes over the whole answer were
            # tried: exact too, but a 135M judge needed ~18 passes of ~100 tokens for 34 entries, 3x slower.
            feed(g.open)
            draws = torch.rand(params.answer_bits, generator=gen)
            for i in range(params.answer_bits):
                lp = torch.log_softmax(last.float(), -1)
                pair = torch.stack([lp[g.zero], lp[g.one]])
                if params.temperature > 0:
                    pick = int(float(draws[i]) < float(torch.softmax(pair / params.temperature, 0)[1]))
                else:
                    pick = int(pair[1] > pair[0])
                feed(((g.zero, g.one)[pick],) + (g.sep if i < params.answer_bits - 1 else g.close), choice=True)
        text = "".join(t.token for t in out_tokens)
        usage = Usage(prompt_tokens=n_in, completion_tokens=len(out_tokens), calls=1)
        return Completion(text=text, usage=usage, model=lm.name,
                          logprobs=out_tokens if params.logprobs else None)
