"""Text corpora → fixed-length token windows.

Sources (`CorpusSpec.source`):
  builtin             offline prose shipped with Python: pydoc topics + standard-library docstrings (~0.5M tokens)
  builtin:code        the standard library's Python sources (~10M tokens), for long runs and benchmarks
  path/to/file.txt    one document per file (a folder of .txt files: one per file)
  path/to/file.jsonl  one document per line, field `text_column` (default "text")
  path/to/file.parquet  column `text_column`
  hf:NAME[:CONFIG]    a Hugging Face dataset (split, text_column), streamed; NAME may be a local dataset folder

Documents are shuffled deterministically by `seed`, tokenized without special tokens, joined with the EOS token and
cut into windows of `ctx_len` tokens. With `bos=True` each window starts with the BOS token followed by
ctx_len-1 corpus tokens (the model sees a proper sequence start, as in training).
"""

from __future__ import annotations

import ast
import json
import random
import sys
import sysconfig
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import ConfigError


@dataclass(frozen=True)
class CorpusSpec:
    source: str = "builtin"
    ctx_len: int = 64
    n_tokens: int = 100_000
    seed: int = 0
    text_column: str = "text"
    split: str = "train"
    bos: bool = True
    chat: bool = False  # conversations ({"messages": [...]}) through the chat template: autointerp.chat
    special_tokens: str = "keep"  # chat: keep or drop the template's special tokens

    def validate(self) -> None:
        if self.n_tokens <= 0:
            raise ConfigError(f"--n-tokens: must be > 0 (got {self.n_tokens})")
        if self.ctx_len < 2:
            raise ConfigError(f"--ctx-len: must be >= 2 (got {self.ctx_len})")
        if self.special_tokens not in ("keep", "drop"):
            raise ConfigError(f"--special-tokens: expected keep or drop (got {self.special_tokens!r})")

    @property
    def n_windows(self) -> int:
        return max(1, self.n_tokens // self.ctx_len)

    def as_dict(self) -> dict:
        d = asdict(self)
        if not self.chat:  # fields added later leave the identities of plain-text corpora as they were
            d.pop("chat")
            d.pop("special_tokens")
        return d


# ---------------------------------------------------------------------------------------------- document sources

def _stdlib_files() -> list[Path]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib).parts
        if rel[0] in ("site-packages", "dist-packages", "idlelib") or any(p in ("test", "tests") for p in rel):
            continue
        out.append(path)
    return out


@lru_cache(maxsize=2)
def _builtin_documents(kind: str) -> tuple[str, ...]:
    """`builtin` (prose, ~0.5M tokens): pydoc topics + stdlib docstrings; `builtin:code` (~10M tokens): stdlib sources."""
    if kind == "code":
        return tuple(p.read_text(encoding="utf-8", errors="replace") for p in _stdlib_files())
    if kind != "docs":
        raise ConfigError(f"corpus builtin:{kind}: unknown built-in corpus (expected builtin or builtin:code)")
    import pydoc_data.topics as topics

    docs = [topics.topics[k] for k in sorted(topics.topics)]
    # Docstrings read with ast (no imports, so no side effects and the same text on every run).
    for path in _stdlib_files():
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 40:
                    docs.append(doc)
    return tuple(docs)  # immutable: callers shuffle their own copy


def jsonl_rows(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed JSON) of each non-blank line, one line at a time (memory is one line, never the file);
    a bad byte or bad JSON is one ConfigError naming the file and line. Every JSON-lines input reads through this:
    corpora, chat corpora, labelled texts."""
    with path.open("rb") as f:  # bytes, decoded per line, so a bad byte is reported at its own line
        # \n, \r\n and lone \r all end a line (as in text mode); JSON text holds no raw \r, so this never cuts a row
        lines = (sub for chunk in f for sub in (chunk.splitlines() or [b""]))
        for lineno, raw in enumerate(lines, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ConfigError(f"{path}:{lineno}: not valid UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                                  "expected UTF-8 JSON lines") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            yield lineno, row


def _read_jsonl(path: Path, column: str) -> Iterator[str]:
    """Documents one line at a time."""
    for lineno, row in jsonl_rows(path):
        if not isinstance(row, dict) or column not in row:
            keys = ", ".join(sorted(row)) if isinstance(row, dict) else type(row).__name__
            raise ConfigError(f"{path}:{lineno}: no text column {column!r} (found: {keys}); set --text-column")
        if not isinstance(row[column], str):
            raise ConfigError(f"{path}:{lineno}: column {column!r} is {type(row[column]).__name__}, expected a string")
        yield row[column]


def _read_parquet(path: Path, column: str) -> Iterator[str]:
    """Documents one record batch at a time, reading only the text column."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise ConfigError(f"{path}: not a readable parquet file ({str(e).splitlines()[0]})") from None
    if column not in names:
        raise ConfigError(f"{path}: no text column {column!r} (found: {', '.join(names)}); set --text-column")
    with pf:
        batches = pf.iter_batches(batch_size=1024, columns=[column])
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except Exception as e:  # a corrupt page deep in the file surfaces only when that batch is decoded
                raise ConfigError(f"{path}: not a readable parquet file ({str(e).splitlines()[0]})") from None
            yield from (t for t in batch.column(0).to_pylist() if isinstance(t, str))


def _file_documents(spec: CorpusSpec) -> Iterator[str]:
    path = Path(spec.source).expanduser()
    if not path.exists():
        raise ConfigError(f"corpus {spec.source}: no such file or folder (expected builtin, a .txt/.jsonl/.parquet "
                          "file or folder, or hf:NAME)")
    if not path.is_dir() and path.suffix not in (".txt", ".jsonl", ".parquet"):
        raise ConfigError(f"corpus {path}: unsupported file type {path.suffix!r} (expected .txt, .jsonl or .parquet)")
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if f.suffix == ".txt":
            yield _read_txt(f)
        elif f.suffix == ".jsonl":
            yield from _read_jsonl(f, spec.text_column)
        elif f.suffix == ".parquet":
            yield from _read_parquet(f, spec.text_column)


def _read_txt(path: Path) -> str:
    """A .txt document; a byte that is not UTF-8 is one error naming the file, line and column (it used to become
    a replacement character silently)."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise ConfigError(f"{path}:{line}: not valid UTF-8 (byte {raw[e.start]:#04x} at column {col}); expected a "
                          "UTF-8 text file") from None


# Local files are shuffled through a buffer of this many documents, so memory is bounded by the buffer, never by the
# corpus (a full shuffle would have to hold every document). A corpus that fits in the buffer gets exactly the full
# `random.Random(seed).shuffle` it always had; a larger one gets a seeded buffer shuffle (the same scheme as the hf:
# source), which reads at most this many documents ahead of what the windows use and then stops.
SHUFFLE_BUFFER = 10_000


def _buffer_shuffle(docs: Iterator[str], seed: int, size: int = SHUFFLE_BUFFER) -> Iterator[str]:
    rng = random.Random(seed)
    buf: list[str] = []
    for d in docs:
        if len(buf) < size:
            buf.append(d)
            continue
        # full buffer: emit a random slot and put the new document in its place
        j = rng.randrange(size)
        yield buf[j]
        buf[j] = d
    rng.shuffle(buf)  # a corpus that fit: identical to shuffling the whole list with Random(seed)
    yield from buf


def _hf_documents(spec: CorpusSpec, ordered: bool = False) -> Iterator[str]:
    import datasets

    name = spec.source[3:]
    config = None
    if ":" in name and not Path(name).exists():
        name, config = name.split(":", 1)
    try:
        ds = datasets.load_dataset(name, config, split=spec.split, streaming=True)
    except Exception as e:
        raise ConfigError(f"corpus {spec.source}: could not load split {spec.split!r} ({str(e).splitlines()[0]})") from None
    if not ordered:
        ds = ds.shuffle(seed=spec.seed, buffer_size=10_000)
    first = True
    for row in ds:
        if first:
            if spec.text_column not in row:
                raise ConfigError(f"corpus {spec.source}: no text column {spec.text_column!r} "
                                  f"(found: {', '.join(sorted(row))}); set --text-column")
            first = False
        text = row[spec.text_column]
        if isinstance(text, str):
            yield text


def iter_documents(spec: CorpusSpec, ordered: bool = False) -> Iterator[str]:
    """The corpus's non-empty documents, shuffled by `spec.seed` (what windows are cut from) or, `ordered`, in
    their file order (per-document outputs, whose rows a user maps back to the input)."""
    if spec.source.startswith("hf:"):
        yield from _hf_documents(spec, ordered)
        return
    if spec.source == "builtin" or spec.source.startswith("builtin:"):
        # already in memory (shipped with Python, a few MB): the full shuffle costs nothing extra
        docs = [d for d in _builtin_documents(spec.source.split(":", 1)[1] if ":" in spec.source else "docs")
                if d.strip()]
        if not ordered:
            random.Random(spec.seed).shuffle(docs)
    else:
        docs = (d for d in _file_documents(spec) if d.strip())
        if not ordered:
            docs = _buffer_shuffle(docs, spec.seed)
    empty = True
    for d in docs:
        empty = False
        yield d
    if empty:
        raise ConfigError(f"corpus {spec.source}: no text found (empty corpus)")


# ---------------------------------------------------------------------------------------------- windows

def iter_windows(spec: CorpusSpec, tokenizer, batch_size: int = 32) -> Iterator[np.ndarray]:
    """Batches [b, ctx_len] int32 of token windows, at most spec.n_windows in all, always in the same order."""
    spec.validate()
    if spec.chat:  # one conversation per window run (autointerp.chat)
        from .chat import chat_windows

        batch = []
        for ids, _ in chat_windows(spec, tokenizer):
            batch.append(ids)
            if len(batch) == batch_size:
                yield np.stack(batch)
                batch = []
        if batch:
            yield np.stack(batch)
        return
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else bos
    body = spec.ctx_len - 1 if spec.bos else spec.ctx_len
    buf: list[int] = []
    batch: list[np.ndarray] = []
    emitted = 0
    docs = iter_documents(spec)
    try:
        for doc in docs:
            ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
            buf.extend(ids)
            if sep is not None:
                buf.append(sep)
            pos = 0  # cut windows at an offset and trim once per document: `del buf[:body]` per window would
            # shift the whole rest of the buffer each time, quadratic in a long document's length
            while len(buf) - pos >= body and emitted < spec.n_windows:
                win = buf[pos:pos + body]
                pos += body
                batch.append(np.asarray(([bos] if spec.bos else []) + win, dtype=np.int32))
                emitted += 1
                if len(batch) == batch_size:
                    yield np.stack(batch)
                    batch = []
            del buf[:pos]
            if emitted >= spec.n_windows:
                break
    finally:
        docs.close()  # stop reading the files now, not when the generator is garbage-collected
    if batch:
        yield np.stack(batch)
    if emitted == 0:
        raise ConfigError(f"corpus {spec.source}: too little text for one window of {spec.ctx_len} tokens")


def is_local(spec: CorpusSpec) -> bool:
    """A corpus of local files (as opposed to the built-in one or an hf: dataset)."""
    return not (spec.source == "builtin" or spec.source.startswith(("builtin:", "hf:")))


def count_windows(spec: CorpusSpec, tokenizer) -> int:
    """Tokenize everything a run over `spec` will read, keep nothing, and return how many windows it gives.
    A bad line anywhere in that part of the corpus raises its ConfigError here, before a run creates anything."""
    return sum(len(b) for b in iter_windows(spec, tokenizer, batch_size=1024))
