"""Rendering token windows for prompts, shared by explainers and scorers.

Example text is untrusted: a window can contain `<<`, `>>`, an answer marker such as `[EXPLANATION]:`, a list
like `[1, 0]`, `${x}` or newlines. Rendering therefore
- replaces `<` / `>` in token text by lookalikes (‹ ›), so only our own highlights read as `<<…>>`, even when two
  tokens `<` `<` meet;
- neutralises our answer markers (`[EXPLANATION]`, `[ANSWER]`) by turning their brackets into fullwidth ones;
- shows a newline as `↵` and tabs/CR as spaces, so one example is always one line of the prompt.
`${x}` needs nothing: string.Template never re-reads substituted values.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

HL_OPEN, HL_CLOSE = "<<", ">>"
MARKERS = ("EXPLANATION", "ANSWER")
_MARKER_RE = re.compile(r"\[(\s*(?:" + "|".join(MARKERS) + r")\s*)\]", re.I)
_TRANSLATE = str.maketrans({"<": "‹", ">": "›", "\n": "↵", "\r": " ", "\t": " "})


def escape_token(s: str) -> str:
    return s.translate(_TRANSLATE)


def neutralise_markers(text: str) -> str:
    return _MARKER_RE.sub(lambda m: "［" + m.group(1) + "］", text)


def highlight_mask(acts: np.ndarray, threshold: float) -> np.ndarray:
    """Tokens shown as activating: act > threshold (and > 0, so a threshold of 0 never marks silent tokens)."""
    acts = np.asarray(acts)
    return (acts > threshold) & (acts > 0)


def render_tokens(tokens: Sequence[str], mask: np.ndarray | Sequence[bool] | None = None, *,
                  escaped: bool = False) -> str:
    """Join token strings; runs of masked tokens are wrapped in one `<<…>>` pair. `escaped`: the strings went
    through escape_token already (LatentRecord.prompt_text memoises that per token id)."""
    tokens = list(tokens)
    table = None if escaped else _TRANSLATE
    if mask is None or not tokens:
        text = "".join(tokens)
        return neutralise_markers(text if table is None else text.translate(table))
    m = np.asarray(mask, bool)[: len(tokens)]
    # one escape per run, not per token: ~170 windows are rendered per latent
    out: list[str] = []
    start = 0
    for end in [*(np.flatnonzero(m[1:] != m[:-1]) + 1).tolist(), len(tokens)]:
        run = "".join(tokens[start:end])
        if table is not None:
            run = run.translate(table)
        out.append(HL_OPEN + run + HL_CLOSE if m[start] else run)
        start = end
    return neutralise_markers("".join(out))


def plain_text(tokens: Sequence[str]) -> str:
    """The window's text for embedding (no escaping: never goes into a prompt)."""
    return "".join(tokens)


def scale_acts(acts: np.ndarray, max_act: float) -> np.ndarray:
    """Activations as integers 0..10 relative to the latent's max (what the `activations` explainer shows)."""
    if max_act <= 0:
        return np.zeros_like(np.asarray(acts), dtype=np.int64)
    return np.clip(np.round(np.asarray(acts, dtype=np.float64) / max_act * 10), 0, 10).astype(np.int64)


def render_activation_list(tokens: Sequence[str], acts: np.ndarray, max_act: float, threshold: float) -> str:
    """`"tok" (7), "tok2" (3)` for the tokens above threshold."""
    scaled = scale_acts(acts, max_act)
    mask = highlight_mask(acts, threshold)
    items = [f'"{neutralise_markers(escape_token(t))}" ({int(v)})' for t, v, m in zip(tokens, scaled, mask) if m]
    return ", ".join(items) if items else "(none)"


def numbered(lines: Sequence[str], start: int = 1) -> str:
    return "\n".join(f"Example {i}: {line}" for i, line in enumerate(lines, start))
