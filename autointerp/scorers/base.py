"""The one scorer signature: `await scorer.score(record, explanation, client, ...) -> ScoreResult`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..llm.base import Usage


@dataclass
class ScoreResult:
    scorer: str
    latent: int
    metrics: dict[str, float | None]  # accuracy, balanced_accuracy, precision, recall, f1, auc, pearson_r, n_failed, ...
    details: dict[str, Any] = field(default_factory=dict)  # per-example predictions, for inspection
    usage: Usage = field(default_factory=Usage)
    prompt_version: str = ""  # content hash of the prompt template(s) used
    model: str = ""  # judge / scorer model
    seed: int = 0
    skipped: str | None = None  # reason, when the latent could not be scored (never a silent 0)


def explanation_parts(explanation) -> tuple[str, tuple[int, ...]]:
    """(text, window ids it was made from): an Explanation carries them (kept out of every test set), a str not."""
    if explanation is None or isinstance(explanation, str):
        return explanation or "", ()
    return explanation.text, tuple(getattr(explanation, "examples_used", ()) or ())
