"""Deterministic rule-based judges for the explainer/detection/fuzzing/intruder tests and bench/llm_calls.py.

They run inside tests/llm_server.py and read the real prompts our templates render:
- explain: the words between << >> in the active examples, most frequent first →
  "[EXPLANATION]: fires on the words: a, b, c";
- detection: an explanation "fires on (the words): a, b" is applied as a rule: 1 when the example contains one
  of those words;
- fuzzing: 1 when every highlighted word is one of those words;
- intruder: the example that lacks the trigger family most examples share (trigger families from synthetic.py).
Variants: `soft_judge` (all-0 answers but informative logprobs), `garbage_judge` (no list at all),
`short_judge` (a list one entry short), `flaky_judge` (garbage for about half the batches), `nonsense_judge` ("no idea" to everything).
"""

from __future__ import annotations

import math
import re
import time
import zlib
from collections import Counter

from synthetic import NAMED_TRIGGERS

_EX = re.compile(r"^Example (\d+): (.*)$", re.M)
_HL = re.compile(r"<<(.*?)>>", re.S)
_WORD = re.compile(r"[A-Za-z0-9]+")
STOP = {"the", "words", "word", "fires", "on", "and", "tokens", "token", "of", "a", "an"}


def _content(messages, role) -> str:
    found = [m["content"] for m in messages if m["role"] == role]
    return found[-1] if found else ""


def task_of(messages) -> str:
    sys_ = _content(messages, "system")
    if "[EXPLANATION]:" in sys_:
        return "explain"
    if "marks were put on the" in sys_:
        return "fuzzing"
    if "[ANSWER]:" in sys_:
        return "intruder"
    if "answer 1 if the explanation says" in sys_:
        return "detection"
    return "unknown"


def rule_words(explanation: str) -> set[str]:
    m = re.search(r"fires on(?: the words)?\s*:\s*(.*)", explanation, re.I)
    if m:
        return {w.strip().lower() for w in m.group(1).split(",") if w.strip()}
    return {w.lower() for w in _WORD.findall(explanation) if w.lower() not in STOP}


def examples(user: str) -> list[str]:
    return [m.group(2) for m in _EX.finditer(user)]


def _words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


def explanation_of(user: str) -> str:
    m = re.search(r"^Explanation: (.*)$", user, re.M)
    return m.group(1) if m else ""


def labels(messages) -> list[int]:
    """The rule's 0/1 answer for each example of a detection/fuzzing prompt."""
    user = _content(messages, "user")
    rule = rule_words(explanation_of(user))
    out = []
    for ex in examples(user):
        if task_of(messages) == "fuzzing":
            hl = [w for span in _HL.findall(ex) for w in _words(span)]
            out.append(int(bool(hl) and all(w in rule for w in hl)))
        else:
            out.append(int(any(w in rule for w in _words(ex.replace("<<", " ").replace(">>", " ")))))
    return out


def explain_answer(messages) -> str:
    user = _content(messages, "user").split("NOT active")[0]
    count = Counter(w for ex in examples(user) for span in _HL.findall(ex) for w in _words(span))
    best = [w for w, _ in sorted(count.items(), key=lambda kv: (-kv[1], kv[0]))[:8]]
    return "The marked tokens are all of one kind.\n[EXPLANATION]: fires on the words: " + ", ".join(best)


def _family(word: str) -> int | None:
    for i, s in enumerate(NAMED_TRIGGERS):
        if word in {w.lower() for w in s}:
            return i
    m = re.fullmatch(r"zq(\d+)[abc]", word)
    return int(m.group(1)) if m else None


def intruder_answer(messages) -> str:
    exs = examples(_content(messages, "user"))
    fams = [{f for w in _words(e) if (f := _family(w)) is not None} for e in exs]
    common = Counter(f for s in fams for f in s).most_common(1)
    pick = 1
    if common:
        lacking = [k for k, s in enumerate(fams) if common[0][0] not in s]
        pick = lacking[0] + 1 if lacking else 1
    return f"Most examples share a word family.\n[ANSWER]: {pick}"


def rule_judge(messages, params):
    task = task_of(messages)
    if task == "explain":
        return explain_answer(messages)
    if task == "intruder":
        return intruder_answer(messages)
    if task in ("detection", "fuzzing"):
        return "Answer: [" + ", ".join(str(v) for v in labels(messages)) + "]"
    return "unknown task"


def _lp_answer(probs: list[float]) -> dict:
    """'[a, b, …]' with one token per digit whose top alternatives give P(1) = p."""
    toks = [{"token": "[", "logprob": 0.0, "top_logprobs": []}]
    for k, p in enumerate(probs):
        chosen = "1" if p >= 0.5 else "0"
        lp1, lp0 = math.log(max(p, 1e-9)), math.log(max(1 - p, 1e-9))
        top = sorted([{"token": "1", "logprob": lp1}, {"token": "0", "logprob": lp0}], key=lambda a: -a["logprob"])
        toks.append({"token": chosen, "logprob": lp1 if chosen == "1" else lp0, "top_logprobs": top})
        toks.append({"token": ", " if k < len(probs) - 1 else "]", "logprob": 0.0, "top_logprobs": []})
    return {"text": "".join(t["token"] for t in toks), "logprobs": toks}


def soft_judge(messages, params):
    """Hard answers all 0, but P(1) = 0.4 where the rule says 1 and 0.1 elsewhere: accuracy at chance, AUC 1."""
    if task_of(messages) in ("detection", "fuzzing"):
        return _lp_answer([0.4 if v else 0.1 for v in labels(messages)])
    return rule_judge(messages, params)


def garbage_judge(messages, params):
    if task_of(messages) in ("detection", "fuzzing"):
        return "I am not sure what you mean. [EXPLANATION]: <<maybe>> [1, 0"
    return rule_judge(messages, params)


def short_judge(messages, params):
    if task_of(messages) in ("detection", "fuzzing"):
        return "[" + ", ".join(str(v) for v in labels(messages)[:-1]) + "]"
    return rule_judge(messages, params)


def flaky_judge(messages, params):
    """Garbage for about half of the batches (decided by a hash of the prompt: deterministic)."""
    if task_of(messages) in ("detection", "fuzzing"):
        if zlib.crc32(_content(messages, "user").encode()) % 2:
            return "no idea"
    return rule_judge(messages, params)


def nonsense_judge(messages, params):
    return "no idea"


def failing_fuzzing_judge(messages, params):
    """Fuzzing requests fail (HTTP 500); detection answers come slowly: one scorer of a latent fails for good
    while the other's calls are still in flight."""
    task = task_of(messages)
    if task == "fuzzing":
        raise RuntimeError("fuzzing is down")
    if task == "detection":
        time.sleep(1.0)
    return rule_judge(messages, params)


def by_model_judge(messages, params):
    """The rule judge for every model but 'careless', which answers 0 to every detection example."""
    if params.get("model") == "careless" and task_of(messages) == "detection":
        return "[" + ", ".join("0" for _ in labels(messages)) + "]"
    return rule_judge(messages, params)
