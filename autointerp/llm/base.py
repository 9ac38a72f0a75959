"""The one async LLM interface every explainer and scorer uses.

Backends (openai-compatible HTTP, local transformers) implement `LLMClient.complete`. Everything above this
layer sees only ChatMessage in, Completion out: text, optional per-token logprobs, and usage.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class ChatMessage:
    role: str  # "system" | "user" | "assistant"
    content: str


@dataclass
class TokenLogprob:
    """One generated token with its logprob and the top alternatives (token -> logprob)."""

    token: str
    logprob: float
    top: dict[str, float] = field(default_factory=dict)


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    calls: int = 0
    cached_calls: int = 0  # answered from the response cache (paid nothing)
    # Token counts of the cached answers (what they cost when first made); not in prompt/completion_tokens.
    cached_prompt_tokens: int = 0
    cached_completion_tokens: int = 0
    estimated_calls: int = 0  # calls whose token counts are a chars/4 estimate (the server sent no usage)

    def add(self, other: "Usage") -> "Usage":
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.cost_usd += other.cost_usd
        self.calls += other.calls
        self.cached_calls += other.cached_calls
        self.cached_prompt_tokens += other.cached_prompt_tokens
        self.cached_completion_tokens += other.cached_completion_tokens
        self.estimated_calls += other.estimated_calls
        return self

    def as_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cost_usd": round(self.cost_usd, 8),
            "calls": self.calls,
            "cached_calls": self.cached_calls,
            "cached_prompt_tokens": self.cached_prompt_tokens,
            "cached_completion_tokens": self.cached_completion_tokens,
            "estimated_calls": self.estimated_calls,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Usage":
        """Inverse of as_dict; unknown keys are ignored, missing ones are 0 (older records)."""
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class Completion:
    text: str
    usage: Usage
    model: str
    logprobs: list[TokenLogprob] | None = None  # None when the backend gives none
    cached: bool = False


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0
    seed: int | None = 0
    logprobs: bool = False
    top_logprobs: int = 0
    # The answer must be a list of this many 0/1 entries ("[1, 0, …]"). A backend that can constrain decoding
    # (local) emits exactly that, choosing each entry between the two digit tokens; others ignore it (the caller
    # parses free text either way). 0: free text.
    answer_bits: int = 0
    # The answer's final line starts with this (e.g. "[EXPLANATION]:"). A backend that can prefill its own turn
    # (local) writes it and generates only the rest of that line; others ignore it (the caller parses either way).
    answer_prefix: str = ""

    def as_dict(self) -> dict:
        d = {
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "seed": self.seed,
            "logprobs": self.logprobs,
            "top_logprobs": self.top_logprobs,
        }
        if self.answer_bits:  # only when set: the cache keys of every other request stay as they were
            d["answer_bits"] = self.answer_bits
        if self.answer_prefix:
            d["answer_prefix"] = self.answer_prefix
        return d


class LLMError(Exception):
    """A failure after retries (transient) or at once (permanent: bad credentials, unknown model)."""


class PermanentLLMError(LLMError):
    """Retrying cannot help (401/403/404, bad request): the job must stop, nothing is recorded as a score."""


@runtime_checkable
class LLMClient(Protocol):
    model: str

    @property
    def supports_logprobs(self) -> bool: ...

    async def complete(self, messages: list[ChatMessage], params: SamplingParams | None = None) -> Completion: ...
