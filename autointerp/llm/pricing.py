"""Price table: $ per 1M prompt / completion tokens, per model.

Lookup order for a model name: exact match, then the same name without a provider prefix
("openai/gpt-4o-mini" -> "gpt-4o-mini", as OpenRouter spells them), then the longest table key that the
name starts with ("gpt-4o-mini-2024-07-18" -> "gpt-4o-mini"). An unknown model costs 0 and is logged once,
so a run never fails on pricing but the operator sees that its cost is not counted.

Override file (JSON or TOML), either at the top level or under a "prices" table:
    {"my-model": {"prompt": 0.2, "completion": 0.6}, "other": [0.1, 0.4]}
    [prices."my-model"]
    prompt = 0.2
    completion = 0.6
"""

from __future__ import annotations

import json
import logging
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from ..errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Price:
    prompt_per_m: float  # $ per 1M prompt tokens
    completion_per_m: float  # $ per 1M completion tokens

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.prompt_per_m + completion_tokens * self.completion_per_m) / 1e6


# Public list prices (USD per 1M tokens) at the time of writing; override them from a file when they change.
DEFAULT_PRICES: dict[str, Price] = {
    "gpt-4o": Price(2.50, 10.00),
    "gpt-4o-mini": Price(0.15, 0.60),
    "gpt-4.1": Price(2.00, 8.00),
    "gpt-4.1-mini": Price(0.40, 1.60),
    "gpt-4.1-nano": Price(0.10, 0.40),
    "o4-mini": Price(1.10, 4.40),
    "claude-3-5-haiku": Price(0.80, 4.00),
    "claude-3-5-sonnet": Price(3.00, 15.00),
    "meta-llama/llama-3.1-8b-instruct": Price(0.02, 0.05),
    "meta-llama/llama-3.3-70b-instruct": Price(0.13, 0.40),
    # In-process models cost nothing per token.
    "builtin:smollm2": Price(0.0, 0.0),
    "builtin:gemma3-270m": Price(0.0, 0.0),
}


def _as_price(model: str, v) -> Price:
    try:
        if isinstance(v, Price):
            return v
        if isinstance(v, Mapping):
            return Price(float(v["prompt"]), float(v["completion"]))
        if isinstance(v, (list, tuple)) and len(v) == 2:
            return Price(float(v[0]), float(v[1]))
    except (KeyError, TypeError, ValueError):
        pass
    raise ConfigError(
        f"price for model {model!r}: expected {{'prompt': $/1M, 'completion': $/1M}} or [prompt, completion], got {v!r}"
    )


class PriceTable:
    def __init__(self, prices: Mapping[str, object] | None = None, *, defaults: bool = True):
        self._prices: dict[str, Price] = dict(DEFAULT_PRICES) if defaults else {}
        self._warned: set[str] = set()
        if prices:
            self.update(prices)

    def update(self, prices: Mapping[str, object]) -> None:
        for model, v in prices.items():
            self._prices[model] = _as_price(model, v)

    @classmethod
    def load(cls, source: "PriceTable | str | Path | Mapping | None" = None) -> "PriceTable":
        """None -> defaults; a dict -> defaults overridden by it; a path -> defaults overridden by the file."""
        if isinstance(source, PriceTable):
            return source
        if source is None or isinstance(source, Mapping):
            return cls(source)
        path = Path(source)
        try:
            text = path.read_text()
            data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        except (OSError, ValueError) as e:  # tomllib/json decode errors are ValueErrors
            raise ConfigError(f"price file {path}: {e}") from e
        if not isinstance(data, Mapping):
            raise ConfigError(f"price file {path}: expected a mapping of model -> price")
        return cls(data.get("prices", data))

    def lookup(self, model: str) -> Price | None:
        if model in self._prices:
            return self._prices[model]
        bare = model.split("/", 1)[1] if "/" in model else None
        if bare and bare in self._prices:
            return self._prices[bare]
        for name in (model, bare):
            if not name:
                continue
            hits = [k for k in self._prices if name.startswith(k)]
            if hits:
                return self._prices[max(hits, key=len)]
        return None

    def cost(self, model: str, prompt_tokens: int, completion_tokens: int) -> float:
        price = self.lookup(model)
        if price is None:
            if model not in self._warned:
                self._warned.add(model)
                log.warning("no price for model %r: its cost is counted as $0 (add it to the price table)", model)
            return 0.0
        return price.cost(prompt_tokens, completion_tokens)

    def __contains__(self, model: str) -> bool:
        return self.lookup(model) is not None
