"""Rule-based judges for the simulation and intervention scorer tests (run inside tests/llm_server.py), plus the
small word-level LatentRecords those tests share.

Judges see the real prompts the scorers render and answer as a model would:
- simulator / simulator_json: predict 10 on tokens whose word is named in the explanation, 0 elsewhere.
  The logprob answer puts a soft distribution on each value token (10 -> EV 8.9, 0 -> EV 0.1), so a test can tell
  expected values from written numbers.
- simulator_sloppy: like simulator (no logprobs), but drops the last row of every example and the last example.
- pick_a: answers A for every intervention pair; pick_keyword: the continuation containing a word of the explanation
  (A when neither or both do).
"""

from __future__ import annotations

import json
import math
import re

import numpy as np

STOP = {"the", "and", "words", "word", "for", "such", "like", "tokens", "token", "names", "name", "about", "text"}


def _last_user(messages: list[dict]) -> str:
    return [m["content"] for m in messages if m["role"] == "user"][-1]


def explanation_words(text: str) -> set[str]:
    m = re.search(r"^Explanation: (.*)$", text, re.M)
    words = re.findall(r"[a-z]+", m.group(1).lower()) if m else []
    return {w for w in words if len(w) > 2 and w not in STOP}


def _examples(text: str) -> list[list[str]]:
    """Token rows of each '## Example k' block."""
    blocks = re.split(r"^## Example \d+\n", text, flags=re.M)[1:]
    return [b.rstrip("\n").split("\n") for b in blocks]


def _value(tok: str, words: set[str]) -> int:
    return 10 if re.sub(r"[^a-z]", "", tok.lower()) in words else 0


def _lp(p: float) -> float:
    return math.log(p)


def simulator(messages: list[dict], params: dict):
    user = _last_user(messages)
    words = explanation_words(user)
    system = messages[0]["content"]
    if "JSON" in system:
        return simulator_json(messages, params)
    pieces: list[dict] = []

    def plain(s: str):
        pieces.append({"token": s, "logprob": -0.01, "top_logprobs": [{"token": s, "logprob": -0.01}]})

    for k, rows in enumerate(_examples(user), 1):
        plain(f"## Example {k}\n")
        for tok in rows:
            v = _value(tok, words)
            plain(tok)
            plain("\t")
            dist = {"10": 0.8, "9": 0.1, "0": 0.1} if v == 10 else {"0": 0.9, "1": 0.1}
            top = [{"token": t, "logprob": _lp(p)} for t, p in dist.items()]
            pieces.append({"token": str(v), "logprob": top[0]["logprob"], "top_logprobs": top})
            plain("\n")
    return {"text": "".join(p["token"] for p in pieces), "logprobs": pieces}


def simulator_json(messages: list[dict], params: dict):
    user = _last_user(messages)
    words = explanation_words(user)
    obj = {str(k): [[t, _value(t, words)] for t in rows] for k, rows in enumerate(_examples(user), 1)}
    return "Here are my predictions:\n```json\n" + json.dumps(obj) + "\n```"


def simulator_sloppy(messages: list[dict], params: dict):
    user = _last_user(messages)
    words = explanation_words(user)
    exs = _examples(user)[:-1]
    return "\n".join(
        f"## Example {k}\n" + "\n".join(f"{t}\t{_value(t, words)}" for t in rows[:-1])
        for k, rows in enumerate(exs, 1)
    )


def _pairs(text: str) -> list[tuple[str, str]]:
    return re.findall(r"^A: (.*)\nB: (.*)$", text, re.M)


def pick_a(messages: list[dict], params: dict):
    return "\n".join(f"{k}: A" for k in range(1, len(_pairs(_last_user(messages))) + 1))


def pick_keyword(messages: list[dict], params: dict):
    user = _last_user(messages)
    words = explanation_words(user)
    out = []
    for k, (a, b) in enumerate(_pairs(user), 1):
        has = [bool(words & set(re.findall(r"[a-z]+", s.lower()))) for s in (a, b)]
        out.append(f"{k}: {'B' if has == [False, True] else 'A'}")
    return "\n".join(out)


# ------------------------------------------------------------------ shared synthetic records


def word_record(active_texts, negative_texts, keywords, *, latent=0, seed=0, lo=5.0, hi=10.0):
    """A LatentRecord over whitespace 'tokens' (' word'): the latent fires on `keywords` (lo..hi, one level per
    window so activation deciles are populated) and never in `negative_texts`."""
    from autointerp.records import Examples, LatentRecord, LatentStats

    rng = np.random.default_rng(seed)
    vocab: dict[str, int] = {"": 0}
    texts = list(active_texts) + list(negative_texts)
    split = [[(" " if i else "") + w for i, w in enumerate(t.split())] for t in texts]
    ctx = max(len(s) for s in split)
    toks = np.zeros((len(split), ctx), np.int32)
    acts = np.zeros((len(split), ctx), np.float32)
    keys = {k.lower() for k in keywords}
    for r, s in enumerate(split):
        level = rng.uniform(lo, hi)
        for c, w in enumerate(s):
            toks[r, c] = vocab.setdefault(w, len(vocab))
            if r < len(active_texts) and re.sub(r"[^a-z]", "", w.lower()) in keys:
                acts[r, c] = level * rng.uniform(0.8, 1.0)
    inv = {i: w for w, i in vocab.items()}
    n_act = len(active_texts)
    ids = np.arange(len(split), dtype=np.int64)
    sample = Examples(ids[:n_act], toks[:n_act], acts[:n_act])
    order = np.argsort(-sample.max_acts, kind="stable")
    top = sample.take(order[: max(5, n_act // 3)])
    neg = Examples(ids[n_act:], toks[n_act:], acts[n_act:])
    fired = acts[acts > 0]
    stats = LatentStats(int(toks.size), int(fired.size), float(fired.max()), float(fired.mean()),
                        np.linspace(0, fired.max(), 11), np.histogram(fired, 10)[0])
    return LatentRecord(latent, top, sample, neg, stats, dictionary_id="test",
                        decode=lambda ids: [inv[int(i)] for i in ids])


def random_sentences(n: int, words: list[str], length: int, seed: int, insert: list[str] | None = None) -> list[str]:
    """n sentences of `length` random filler words; with `insert`, one or two of those words placed in each."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        s = list(rng.choice(words, size=length))
        if insert:
            for _ in range(int(rng.integers(1, 3))):
                s[int(rng.integers(length))] = str(rng.choice(insert))
        out.append(" ".join(s))
    return out
