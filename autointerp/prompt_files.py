"""Prompt templates are files in `prompts/`, versioned by content hash.

File format: sections introduced by a line `### system`, `### user` or `### assistant` (few-shot turns repeat
user/assistant). Variables are `${name}` (string.Template). `load_prompt(name, variables={...})` checks at load time
that the template uses exactly the variables the caller will fill, so a broken template fails before a job starts,
not in the middle of one.
"""

from __future__ import annotations

import hashlib
import os
import re
import string
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .errors import ConfigError
from .llm.base import ChatMessage

_SECTION = re.compile(r"^### (system|user|assistant)\s*$", re.M)


_PACKAGED = Path(__file__).resolve().parent / "prompts"


def prompts_dir() -> Path:
    env = os.environ.get("AUTOINTERP_PROMPTS")
    if env:
        return Path(env)
    return _PACKAGED


@lru_cache(maxsize=256)
def _resolve(path: Path) -> Path:
    """A prompt path with links resolved, once per path: resolve() walks every component (~0.5 ms), and scorers
    load their prompt on every call."""
    return path.resolve()


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    path: Path
    sections: tuple[tuple[str, string.Template], ...]
    variables: frozenset[str]
    version: str  # "<name>@<sha256[:12]>" of the file's bytes

    def render(self, **values: str) -> list[ChatMessage]:
        missing = self.variables - values.keys()
        if missing:
            raise ConfigError(f"prompt {self.path}: no value given for ${{{sorted(missing)[0]}}}")
        # substitute() only reads placeholders in the template, never in the values: example text that
        # contains "${x}" or "$" is inserted verbatim.
        return [ChatMessage(role, tpl.substitute({k: str(values[k]) for k in self.variables})) for role, tpl in self.sections]


def _template_variables(tpl: string.Template, path: Path) -> set[str]:
    names: set[str] = set()
    for m in tpl.pattern.finditer(tpl.template):
        if m.group("invalid") is not None:
            raise ConfigError(f"prompt {path}: stray '$' at offset {m.start()} (write $$ for a literal dollar)")
        name = m.group("named") or m.group("braced")
        if name:
            names.add(name)
    return names


@lru_cache(maxsize=128)
def _load(path: Path) -> PromptTemplate:
    if not path.is_file():
        avail = ", ".join(sorted(p.stem for p in path.parent.glob("*.md"))) or "none"
        raise ConfigError(f"prompt file {path} not found (available: {avail})")
    raw = path.read_bytes()
    text = raw.decode("utf-8")
    parts = _SECTION.split(text)
    if len(parts) < 3:
        raise ConfigError(f"prompt {path}: expected sections '### system' / '### user' / '### assistant'")
    sections = []
    variables: set[str] = set()
    for role, body in zip(parts[1::2], parts[2::2]):
        tpl = string.Template(body.strip("\n"))
        variables |= _template_variables(tpl, path)
        sections.append((role, tpl))
    version = f"{path.stem}@{hashlib.sha256(raw).hexdigest()[:12]}"
    return PromptTemplate(path.stem, path, tuple(sections), frozenset(variables), version)


def load_prompt(name: str, variables: set[str] | frozenset[str], directory: Path | None = None) -> PromptTemplate:
    """Load `prompts/<name>.md` and check it uses exactly `variables` (no missing, no unknown ones)."""
    path = (directory or prompts_dir()) / f"{name}.md"
    tpl = _load(_resolve(path))
    want = set(variables)
    if tpl.variables != want:
        missing = sorted(want - tpl.variables)
        extra = sorted(tpl.variables - want)
        what = []
        if missing:
            what.append("missing variable(s) " + ", ".join("${" + v + "}" for v in missing))
        if extra:
            what.append("unknown variable(s) " + ", ".join("${" + v + "}" for v in extra))
        raise ConfigError(f"prompt {path}: {'; '.join(what)} (expected exactly: {', '.join(sorted(want))})")
    return tpl
