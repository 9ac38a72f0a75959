"""LLM client layer: one async interface, backends `openai` (any OpenAI-compatible server) and `local`."""

from .base import (  # noqa: F401
    ChatMessage,
    Completion,
    LLMClient,
    LLMError,
    PermanentLLMError,
    SamplingParams,
    TokenLogprob,
    Usage,
)
