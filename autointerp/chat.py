"""Chat corpora: conversations (`messages` lists, as in FAST's instruct-model SAEs) through the subject model's chat
template, one conversation per window run (windows never mix two conversations), with each token's role kept.

A conversation is rendered by `tokenizer.apply_chat_template` and tokenized with offsets. A token's role is the role
of the message whose content holds it; template tokens (turn headers, <|im_start|>, a default system prompt the
template adds) have role "other". `special_tokens="drop"` removes the tokenizer's special ids (<|im_start|>,
<|im_end|>, …) from the sequence; "keep" leaves them in (extraction ignores their activations either way, as for
every special token).

A conversation longer than a window continues in the next windows (BOS first when the spec asks for it and
special tokens are kept); its last window is padded with the pad token (a special token: ignored). So every
window starts at a conversation boundary or inside the same conversation as the window before it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import ConfigError

ROLES = ("other", "system", "user", "assistant", "tool")
ROLE_ID = {r: i for i, r in enumerate(ROLES)}


def _check_messages(messages, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ConfigError(f"{where}: expected a non-empty list of messages ({{role, content}} objects)")
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ConfigError(f"{where}: message {k} is not a {{\"role\": str, \"content\": str}} object")
    return messages


def special_ids(tokenizer) -> set[int]:
    """The tokenizer's special ids plus every added token marked special (a GGUF tokenizer may list <|im_end|> only
    there)."""
    out = set(tokenizer.all_special_ids or [])
    for i, t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(t, "special", False):
            out.add(int(i))
    return out


def pad_id(tokenizer) -> int:
    """The id a short window is padded with: the pad token, else the unknown/end-of-text token, else EOS (all
    special, so ignored by extraction), but not the BOS / turn-start token where another exists (SmolLM2 pads with
    <|im_start|>, which would then open every padded window's tail and be present with special tokens dropped)."""
    cands = [i for i in (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.eos_token_id) if i is not None]
    return int(next((i for i in cands if i != tokenizer.bos_token_id), cands[0] if cands else 0))


def conversation_tokens(tokenizer, messages: list[dict], special_tokens: str = "keep") -> tuple[list[int], list[int]]:
    """(token ids, role ids) of one conversation rendered by the tokenizer's chat template."""
    if special_tokens not in ("keep", "drop"):
        raise ConfigError(f"--special-tokens {special_tokens!r}: expected keep or drop")
    if getattr(tokenizer, "chat_template", None) is None:
        raise ConfigError("chat corpus: the subject model's tokenizer has no chat template")
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans, cursor = [], 0
    for m in messages:  # each message's content, found in order in the rendered text
        content = m["content"]
        at = text.find(content, cursor) if content else -1
        if at < 0 and content.strip():
            content = content.strip()
            at = text.find(content, cursor)
        if at >= 0:
            spans.append((at, at + len(content), ROLE_ID.get(m["role"], 0)))
            cursor = at + len(content)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, roles = [], []
    special = special_ids(tokenizer) if special_tokens == "drop" else set()
    k = 0
    for tid, (start, end) in zip(enc["input_ids"], enc["offset_mapping"]):
        if tid in special:
            continue
        while k < len(spans) and start >= spans[k][1]:
            k += 1
        role = spans[k][2] if k < len(spans) and spans[k][0] <= start < spans[k][1] and end > start else 0
        ids.append(int(tid))
        roles.append(role)
    return ids, roles


def _read_conversations(path: Path, column: str) -> Iterator[list[dict]]:
    from .corpus import jsonl_rows

    for lineno, row in jsonl_rows(path):
        where = f"{path}:{lineno}"
        if not isinstance(row, dict) or column not in row:
            keys = ", ".join(sorted(row)) if isinstance(row, dict) else type(row).__name__
            raise ConfigError(f"{where}: no {column!r} field (found: {keys}); chat corpora need a list of "
                              "messages (set --text-column)")
        yield _check_messages(row[column], where)


def iter_conversations(spec, ordered: bool = False) -> Iterator[list[dict]]:
    """The corpus's conversations: a .jsonl file or folder of them (field `messages`, or --text-column), or an hf:
    dataset with such a column; shuffled by `spec.seed` unless `ordered`."""
    from .corpus import SHUFFLE_BUFFER, _buffer_shuffle

    column = spec.text_column if spec.text_column != "text" else "messages"
    if spec.source.startswith("hf:"):
        import datasets

        name = spec.source[3:]
        try:
            ds = datasets.load_dataset(name, split=spec.split, streaming=True)
        except Exception as e:
            raise ConfigError(f"corpus {spec.source}: could not load split {spec.split!r} "
                              f"({str(e).splitlines()[0]})") from None
        if not ordered:
            ds = ds.shuffle(seed=spec.seed, buffer_size=SHUFFLE_BUFFER)
        for i, row in enumerate(ds):
            if column not in row:
                raise ConfigError(f"corpus {spec.source}: no {column!r} column (found: {', '.join(sorted(row))})")
            yield _check_messages(row[column], f"{spec.source} row {i}")
        return
    path = Path(spec.source).expanduser()
    if not path.exists():
        raise ConfigError(f"corpus {spec.source}: no such file or folder (a chat corpus is a .jsonl of messages)")
    files = sorted(p for p in path.rglob("*.jsonl")) if path.is_dir() else [path]
    if not files or any(f.suffix != ".jsonl" for f in files):
        raise ConfigError(f"corpus {spec.source}: a chat corpus is a .jsonl file (or a folder of them) of "
                          "{\"messages\": [...]} rows")
    convs = (c for f in files for c in _read_conversations(f, column))
    yield from (convs if ordered else _buffer_shuffle(convs, spec.seed))


def chat_windows(spec, tokenizer) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(ids [ctx_len] int32, roles [ctx_len] int8) per window, in order, at most spec.n_windows."""
    T = spec.ctx_len
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    pad = pad_id(tokenizer)
    lead = spec.bos and spec.special_tokens == "keep" and bos is not None
    emitted = 0
    for conv in iter_conversations(spec):
        ids, roles = conversation_tokens(tokenizer, conv, spec.special_tokens)
        last = max((k for k, r in enumerate(roles) if r), default=len(ids) - 1)  # the last message token
        pos, first = 0, True
        while (first or pos <= last) and pos < len(ids) and emitted < spec.n_windows:  # no window of template
            # tokens alone after the last message
            # the first window starts where the conversation does (its template opens it); a continuation gets
            # BOS, as every packed text window does
            head = [bos] if lead and not (first and ids and ids[0] == bos) else []
            take = T - len(head)
            w_ids = head + ids[pos:pos + take]
            w_roles = [0] * len(head) + roles[pos:pos + take]
            pos += take
            first = False
            n_pad = T - len(w_ids)
            yield (np.asarray(w_ids + [pad] * n_pad, np.int32), np.asarray(w_roles + [0] * n_pad, np.int8))
            emitted += 1
        if emitted >= spec.n_windows:
            return
    if emitted == 0:
        raise ConfigError(f"corpus {spec.source}: no conversation")


def window_roles(spec, tokenizer, window_ids: np.ndarray) -> np.ndarray:
    """The roles [len(window_ids), ctx_len] of the given windows (global ids, ascending): recomputed from the
    corpus (the same deterministic windows), so no pass has to carry them."""
    want = np.asarray(window_ids, np.int64)
    out = np.zeros((len(want), spec.ctx_len), np.int8)
    if not len(want):
        return out
    k = 0
    for wid, (_, roles) in enumerate(chat_windows(spec, tokenizer)):
        if wid == want[k]:
            out[k] = roles
            k += 1
            if k == len(want):
                break
    return out


def role_shares(cache) -> np.ndarray | None:
    """Per latent, the share of its firing tokens in each role [n_latents, len(ROLES)], over every firing token
    of its kept windows (top and sample); None for a cache without roles."""
    try:
        roles = cache.array("roles")
    except (ConfigError, FileNotFoundError, KeyError):
        return None
    n = cache.n_latents
    counts = np.zeros(n * len(ROLES), np.int64)
    for buf in ("top", "sample"):
        try:
            ptr, rows, nnz = cache.array(f"{buf}_ptr"), cache.array(f"{buf}_rows"), cache.array(f"{buf}_nnz")
            eptr, pos = cache.array(f"{buf}_eptr"), cache.array(f"{buf}_pos")
        except (ConfigError, FileNotFoundError, KeyError):
            return None  # the old dense format: no per-token positions to read
        slot_latent = np.repeat(np.arange(n), np.diff(ptr))
        entry_slot = np.repeat(np.arange(len(rows)), np.asarray(nnz, np.int64))
        del eptr  # entries run slot by slot in latent order: entry_slot gives each entry's slot directly
        r = np.asarray(roles)[np.asarray(rows)[entry_slot], np.asarray(pos, np.int64)]
        np.add.at(counts, slot_latent[entry_slot] * len(ROLES) + r, 1)
    counts = counts.reshape(n, len(ROLES)).astype(np.float64)
    return counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
