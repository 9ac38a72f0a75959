"""Scorer registry. Each scorer is a module `autointerp.scorers.<name>` exposing

    NAME: str
    Config: a dataclass (defaults usable as is)
    async def score(record: LatentRecord, explanation: str | Explanation, client: LLMClient | None, *,
                    config: Config, seed: int) -> ScoreResult
    def preflight(config: Config, client: LLMClient | None) -> list[PromptTemplate]   (optional)

`preflight` checks what can be checked before a job's first LLM call: it loads (so checks) every prompt template
`score` will use and returns them, and fails on a config `score` could not run with (a scorer without it needs
neither templates nor checks).

Modules are imported on first use, so a scorer with heavy dependencies (torch models, embedders) costs nothing
until asked for. Adding a scorer = adding its module and its name to SCORERS.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import ConfigError
from .base import ScoreResult  # noqa: F401

SCORERS = ("detection", "fuzzing", "intruder", "simulation", "embedding", "surprisal", "intervention")


@dataclass(frozen=True)
class Scorer:
    name: str
    score: Callable[..., Any]  # the async score function
    Config: type
    preflight: Callable[..., list] = lambda config, client=None: []

    def config(self, **kw):
        return self.Config(**kw)


def get_scorer(name: str) -> Scorer:
    if name not in SCORERS:
        raise ConfigError(f"unknown scorer {name!r}; valid scorers: {', '.join(SCORERS)}")
    try:
        mod = importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name == f"{__name__}.{name}":
            raise ConfigError(f"scorer {name!r} is registered but its module is not available") from e
        raise
    return Scorer(name, mod.score, mod.Config, getattr(mod, "preflight", Scorer.preflight))
