"""LLM client layer: one async interface, backends `openai` (any OpenAI-compatible server) and `local`.

    from autointerp.llm import make_client, client_from_spec, usage_scope, ChatMessage, SamplingParams
    client = client_from_spec("openai:gpt-4o-mini")            # or "openai:MODEL@http://host:port/v1", "local"
    c = await client.complete([ChatMessage("user", "hi")], SamplingParams(max_tokens=16))
    c.text, c.logprobs, c.usage.cost_usd, client.usage_total

See client.py for the spec grammar, caching and usage accounting; openai_backend.py for the retry policy.
"""

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
from .cache import DEFAULT_CACHE_PATH, ResponseCache, cache_key  # noqa: F401
from .client import (  # noqa: F401
    MeteredClient,
    UsageMeter,
    client_from_spec,
    make_client,
    parse_spec,
    usage_scope,
)
from .pricing import DEFAULT_PRICES, Price, PriceTable  # noqa: F401

# Backends import the openai package / torch lazily through make_client; import them directly when needed:
#   from autointerp.llm.openai_backend import OpenAIBackend
#   from autointerp.llm.local_backend import LocalBackend
