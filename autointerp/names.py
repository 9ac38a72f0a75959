"""How things are named: one slug rule for dictionary names (store rows, cache subfolders, URLs) and one content
digest for keys."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any


def slug(text: str) -> str:
    """A name safe in a path, a URL segment and a command line: runs of other characters become one '-'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:120] or "dictionary"


def dictionary_name(dictionary_id: str, hookpoint: str) -> str:
    """The name `autointerp extract` registers (and names a target's subfolder): checkpoint tail + hookpoint."""
    return slug(f"{str(dictionary_id).rstrip('/').split('/')[-1]}-{hookpoint}")


def digest(obj: Any) -> str:
    """A 32-hex key of a JSON-able value (key order does not matter)."""
    raw = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(raw.encode()).hexdigest()[:32]
