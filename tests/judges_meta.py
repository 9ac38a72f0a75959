"""A stand-in explainer for meta-latents (run inside tests/llm_server.py): it answers with the theme word that the
listed base-latent explanations share most often, as a capable LLM would name their common topic."""

from __future__ import annotations

import re
from collections import Counter

THEMES = ("astronomy", "cooking", "football", "banking", "poetry", "chemistry", "weather", "music", "law",
          "medicine", "gardening", "railways", "chess", "painting", "volcanoes", "sailing")


def meta_judge(messages: list[dict], params: dict) -> str:
    user = messages[-1]["content"]
    listed = re.findall(r"^Example \d+:\s*(.*)$", user, re.M)
    words = Counter(w for line in listed for w in set(re.findall(r"[a-z]+", line.lower())) if w in THEMES)
    best = max(words, key=lambda w: (words[w], w)) if words else "nothing in common"
    return f"They share one topic.\n[EXPLANATION]: {best}"
