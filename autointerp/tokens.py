"""Token ids -> display strings: one memoising decoder, and one per subject model for whoever shows tokens (the
API, exports, the CLI)."""

from __future__ import annotations

import logging
import threading

from .formatting import escape_token

log = logging.getLogger(__name__)
_LOCK = threading.Lock()


class TokenDecoder:
    """decode(ids) -> one string per token, each id decoded once per decoder: a HF `decode([id])` costs ~50 µs, and
    a latent's prompts, embeddings and pages render ~20k tokens from a small vocabulary. Without a tokenizer a
    token shows as `#id`."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.memo: dict[int, str] = {}
        self.memo_escaped: dict[int, str] = {}

    def _miss(self, i: int) -> str:
        s = self.tok.decode([i]) if self.tok is not None else f"#{i}"
        self.memo[i] = s
        return s

    def _miss_escaped(self, i: int) -> str:
        s = self.memo_escaped[i] = escape_token(self.memo[i] if i in self.memo else self._miss(i))
        return s

    def __call__(self, ids) -> list[str]:
        return self._lookup(ids, self.memo, self._miss)

    def escaped(self, ids) -> list[str]:
        """The strings as a prompt shows them (formatting.escape_token), memoised alike."""
        return self._lookup(ids, self.memo_escaped, self._miss_escaped)

    @staticmethod
    def _lookup(ids, memo: dict[int, str], miss) -> list[str]:
        ids = ids.tolist() if hasattr(ids, "tolist") else ids
        try:
            return [memo[i] for i in ids]
        except KeyError:
            return [memo[i] if i in memo else miss(i) for i in ids]


def tokenizer_for(model_spec: str):
    """The subject model's tokenizer, or None when it cannot be loaded here (tokens then show as ids)."""
    from .hf_loading import load_tokenizer

    try:
        return load_tokenizer(model_spec)
    except Exception as e:  # noqa: BLE001 — a display nicety; the ids are still shown
        log.warning("tokenizer of %s not loadable (%s): tokens are shown as ids", model_spec, e)
        return None


_DECODERS: dict[str, TokenDecoder] = {}


def decoder_for(model_spec: str) -> TokenDecoder:
    """The process's decoder for a subject model's tokens."""
    with _LOCK:
        d = _DECODERS.get(model_spec)
    if d is None:
        d = TokenDecoder(tokenizer_for(model_spec))
        with _LOCK:
            d = _DECODERS.setdefault(model_spec, d)
    return d
