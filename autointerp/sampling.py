"""Split one latent's examples into an explainer set, an activating test set and negatives.

- explainer set: the top windows, quantile-stratified windows from `record.sample`, or half of each;
- test set: activating windows stratified over activation deciles (edges = k/10 of the max activation of the
  pooled activating windows, top ∪ sample), each example tagged with its decile;
- negatives: pool windows where the latent never fires, part random, part "hard" (most similar to the test
  windows by sentence embedding); a few more, disjoint from the test ones, for the contrastive explainer.

The explainer and test sets are disjoint by window id, checked on every call (`LeakageError`). Everything is
deterministic per (seed, latent); random picks take the windows with the smallest per-window hash keys, so
excluding windows that were not picked changes no pick (every explainer of a latent faces the same test set).
A latent with too few examples gives `Skipped(reason)`, never a score.

Display windows. Prompts show `display_ctx` tokens of each stored window (`LatentSample.shown`): an activating
window is cropped around its peak (the first token at its max activation), which lands at a position drawn from
[display_ctx/4, display_ctx) by a per-(seed, window) hash, so at least a quarter of the crop is preceding context
(what the latent reads) and the peak's position varies from window to window; a negative is cropped at an offset
drawn by the same hash. A crop never moves a window in or out of any set: ids, leakage checks and picks are those
of the whole windows, and a window's max activation (decile, highlight thresholds) is kept, since the peak is in.

Embeddings: `NegativePool` embeds the shared pool once (whole windows: text -> unit vector, keyed by window id).
Hard negatives are the pool windows most similar to the activating test windows, each of which stands as its
whole-window vector when it is one of the pool's windows (free), else as its display crop's (embedded on first use
and kept in a bounded cache, so the explainer's and the scorers' samplings of one latent embed it once): the
per-latent work is at most n_test short texts and one [n_neg, n_test] matrix product. The explainer windows are
embedded only when the contrastive explainer's negatives are asked for (`explain_negatives=True`).
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Hashable, Iterable, Sequence

import numpy as np

from .errors import ConfigError
from .formatting import plain_text
from .records import Examples, LatentRecord

EXPLAIN_FROM = ("top", "quantiles", "mixed")


class LeakageError(RuntimeError):
    """An example used to explain a latent also appears in its test set."""


@dataclass(frozen=True)
class Skipped:
    """The latent could not be sampled/explained/scored; the reason is stored instead of a score."""

    reason: str
    latent: int = -1
    usage: object = None  # Usage of LLM calls already made (e.g. an explainer answer that held nothing)


@dataclass(frozen=True)
class SamplingConfig:
    n_explain: int = 20
    explain_from: str = "top"  # top | quantiles | mixed
    n_test: int = 50  # activating test examples (5 per decile by default)
    n_quantiles: int = 10
    n_negatives: int = 50
    hard_negative_fraction: float = 0.5  # needs a NegativePool; without one all negatives are random
    n_explain_negatives: int = 10  # for the contrastive explainer, disjoint from the test negatives
    min_explain: int = 5
    min_test: int = 10
    min_negatives: int = 10
    # tokens of each window that prompts show (and hard negatives compare); 0 = the whole stored window.
    # 32 (delphi's example length): 28.7k prompt characters per latent at 64-token windows, 39.8k at 48, 51.8k
    # whole (issue 10's target: <= 35k); it keeps 80% of the fuzzing highlights (bench/llm_calls.py)
    display_ctx: int = 32

    def __post_init__(self):
        if self.explain_from not in EXPLAIN_FROM:
            raise ConfigError(f"explain_from={self.explain_from!r}: expected one of {', '.join(EXPLAIN_FROM)}")
        if not 0.0 <= self.hard_negative_fraction <= 1.0:
            raise ConfigError(f"hard_negative_fraction={self.hard_negative_fraction}: expected 0..1")
        if self.n_quantiles < 1 or min(self.n_explain, self.n_test, self.n_negatives, self.n_explain_negatives) < 0:
            raise ConfigError("sampling sizes must be >= 0 and n_quantiles >= 1")
        if self.display_ctx < 0 or 0 < self.display_ctx < 4:
            raise ConfigError(f"display_ctx={self.display_ctx}: expected 0 (whole windows) or >= 4 tokens")


@dataclass
class LatentSample:
    latent: int
    seed: int
    max_act: float  # max activation of the pooled activating windows (decile edges, highlight thresholds)
    explain: Examples
    test: Examples  # activating test windows
    test_quantile: np.ndarray  # [n_test] decile index, 0 = lowest activations
    negatives: Examples  # test negatives
    negative_is_hard: np.ndarray  # [n_negatives] bool
    explain_negatives: Examples  # contrastive explainer only
    n_quantiles: int = 10
    display_ctx: int = 0  # 0: prompts show whole windows

    def shown(self, part: str) -> Examples:
        """`part` ("explain", "test", "negatives", "explain_negatives") as prompts show it: display windows."""
        ex = getattr(self, part)
        return display_view(ex, self.display_ctx, self.seed, activating=part in ("explain", "test"))

    @property
    def explain_ids(self) -> set[int]:
        return {int(i) for i in self.explain.window_ids} | {int(i) for i in self.explain_negatives.window_ids}

    @property
    def test_ids(self) -> set[int]:
        return {int(i) for i in self.test.window_ids} | {int(i) for i in self.negatives.window_ids}


def rng_for(seed: int, latent: int, *salt: str | int) -> np.random.Generator:
    """A Generator that depends only on (seed, latent, salt...)."""
    words = [int(seed) & 0xFFFFFFFF, int(latent) & 0xFFFFFFFF]
    words += [zlib.crc32(s.encode()) if isinstance(s, str) else int(s) & 0xFFFFFFFF for s in salt]
    return np.random.default_rng(np.random.SeedSequence(words))


def window_keys(window_ids: np.ndarray, seed: int, latent: int, salt: str) -> np.ndarray:
    """A pseudo-random uint64 key per window id (splitmix64 of id ^ a (seed, latent, salt) word).

    Random picks take the smallest keys of a candidate set, so a window's selection never depends on which
    other windows are candidates: excluding windows that were not picked leaves every pick unchanged (the
    same test set for every explainer of a latent, whatever windows each one used)."""
    mix = rng_for(seed, latent, salt).integers(0, 2**63, dtype=np.uint64)
    x = np.asarray(window_ids).astype(np.uint64) ^ np.uint64(mix)
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def display_starts(ex: Examples, length: int, seed: int, *, activating: bool) -> np.ndarray:
    """First token of each window's display crop of `length` tokens (see the module docstring)."""
    n, ctx = ex.tokens.shape
    if not length or length >= ctx or not n:
        return np.zeros(n, np.int64)
    h = window_keys(ex.window_ids, seed, 0, "display")
    if not activating:
        return (h % np.uint64(ctx - length + 1)).astype(np.int64)
    lo = length // 4
    at = lo + (h % np.uint64(length - lo)).astype(np.int64)  # the peak's position inside the crop
    return np.clip(np.argmax(ex.acts, axis=1) - at, 0, ctx - length)


def display_view(ex: Examples, length: int, seed: int, *, activating: bool) -> Examples:
    """The windows cropped to `length` tokens (whole windows when `length` is 0 or not shorter)."""
    n, ctx = ex.tokens.shape
    if not length or length >= ctx:
        return ex
    cols = display_starts(ex, length, seed, activating=activating)[:, None] + np.arange(length)
    rows = np.arange(n)[:, None]
    return Examples(ex.window_ids, ex.tokens[rows, cols], ex.acts[rows, cols])


def _smallest(keys: np.ndarray, among: np.ndarray, k: int) -> np.ndarray:
    """The k members of `among` (indices) with the smallest keys, sorted by index."""
    return np.sort(among[np.argsort(keys[among], kind="stable")[:k]])


# --------------------------------------------------------------------------------------------------- embeddings


class NegativePool:
    """Window embeddings: the pool is embedded once at build, other windows on first use.

    Keys: a window id (the whole window; kept for the run) or a tuple such as (window id, start, stop) for a display
    crop (kept in a bounded LRU of `max_crops` vectors: crops are per latent, so keeping all would grow without
    bound over a million-latent job).
    `embed_fn(texts) -> [n, d]` unit vectors; defaults to `autointerp.embedder.embed` with the sentence embedder
    `embedder` (None: $AUTOINTERP_EMBEDDER or the local MiniLM). `embedder` names the vectors' space: a scorer that
    embeds with another model must not mix its vectors with these.
    """

    def __init__(self, embed_fn: Callable[[list[str]], np.ndarray] | None = None, embedder: str | None = None,
                 max_crops: int = 20_000):
        if embed_fn is None:
            from .embedder import embed

            def embed_fn(texts: list[str]) -> np.ndarray:
                return embed(texts, embedder)
        self._embed = embed_fn
        self.embedder = embedder
        self._index: dict[int, int] = {}
        self._blocks: list[np.ndarray] = []
        self._mat: np.ndarray | None = None
        self._crops: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._built: frozenset[int] = frozenset()  # the pool's own windows (what it was built with)
        self.max_crops = max_crops
        self._lock = threading.Lock()
        self.n_embedded = 0  # texts sent to embed_fn (tests check the pool is not re-embedded)

    @classmethod
    def from_texts(cls, window_ids: Sequence[int], texts: Sequence[str], embed_fn=None,
                   embedder: str | None = None) -> "NegativePool":
        pool = cls(embed_fn, embedder)
        pool.add(window_ids, texts)
        pool._built = frozenset(pool._index)
        return pool

    @classmethod
    def from_examples(cls, examples: Examples, decode, embed_fn=None, embedder: str | None = None) -> "NegativePool":
        texts = [plain_text(_decode(decode, t)) for t in examples.tokens]
        return cls.from_texts(examples.window_ids, texts, embed_fn, embedder)

    @classmethod
    def from_matrix(cls, window_ids: Sequence[int], matrix: np.ndarray, embed_fn=None,
                    embedder: str | None = None) -> "NegativePool":
        """Reuse embeddings computed elsewhere (e.g. saved with the cache), made with `embedder`."""
        pool = cls(embed_fn, embedder)
        pool._insert([int(i) for i in window_ids], np.asarray(matrix, np.float32))
        pool._built = frozenset(pool._index)
        return pool

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, window_id: int) -> bool:
        return int(window_id) in self._index

    def built_with(self, window_id: int) -> bool:
        """Whether the window is one of the pool's own (embedded whole at build), not one added since: a fixed
        set, so what depends on it does not depend on what a process happened to embed before."""
        return int(window_id) in self._built

    def _insert(self, ids: list[int], vecs: np.ndarray) -> None:
        with self._lock:
            new: list[tuple[int, np.ndarray]] = []
            for i, v in zip(ids, vecs):
                if i not in self._index:  # the first row of an id repeated in the input, as its one row
                    self._index[i] = len(self._index)
                    new.append((i, v))
            if new:
                self._blocks.append(np.stack([v for _, v in new]).astype(np.float32))
                self._mat = None

    def _known(self, key) -> bool:
        return key in self._crops if isinstance(key, tuple) else key in self._index

    def _embed_new(self, keys: list, texts: Sequence[str]) -> dict:
        """Embed the keys not known yet (once per distinct key); {key: vector} of what was embedded."""
        todo = list({k: t for k, t in zip(keys, texts) if not self._known(k)}.items())
        if not todo:
            return {}
        vecs = np.asarray(self._embed([t for _, t in todo]), np.float32)
        self.n_embedded += len(todo)
        self._insert([k for k, _ in todo if not isinstance(k, tuple)],
                     np.asarray([v for (k, _), v in zip(todo, vecs) if not isinstance(k, tuple)], np.float32))
        out = {k: v for (k, _), v in zip(todo, vecs)}
        with self._lock:
            for k, v in out.items():
                if isinstance(k, tuple):
                    self._crops[k] = v
            while len(self._crops) > self.max_crops:
                self._crops.popitem(last=False)
        return out

    def add(self, window_ids: Iterable, texts: Sequence[str]) -> dict:
        """Embed what is not known yet; {key: vector} of what was embedded now."""
        return self._embed_new([_norm_key(i) for i in window_ids], texts)

    def matrix(self, window_ids: Sequence, texts: Callable[[list], list[str]] | None = None) -> np.ndarray:
        """Rows for these keys; keys not yet known are embedded via `texts(missing_keys)` and cached."""
        keys = window_ids.tolist() if isinstance(window_ids, np.ndarray) else [_norm_key(i) for i in window_ids]
        missing = list(dict.fromkeys(k for k in keys if not self._known(k)))
        fresh = {}
        if missing:
            if texts is None:
                raise KeyError(f"window ids not in the embedding pool: {missing[:5]}")
            fresh = self.add(missing, texts(missing)) or {}
        with self._lock:
            if self._mat is None:
                self._mat = np.concatenate(self._blocks) if self._blocks else np.zeros((0, 0), np.float32)
                self._blocks = [self._mat]
            mat = self._mat
            if not any(isinstance(k, tuple) for k in keys):
                return mat[[self._index[k] for k in keys]]
            rows = []
            for k in keys:
                if isinstance(k, tuple):
                    v = fresh.get(k)
                    if v is None:
                        v = self._crops[k]
                        self._crops.move_to_end(k)
                    rows.append(v)
                else:
                    rows.append(mat[self._index[k]])
        return np.stack(rows).astype(np.float32, copy=False) if rows else np.zeros((0, mat.shape[1]), np.float32)


def _norm_key(k) -> Hashable:
    return tuple(int(x) for x in k) if isinstance(k, (tuple, list)) else int(k)


_BLAS = None


def _dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b. Small products run on one BLAS thread: threads cannot speed them up, and on a busy machine
    multi-threaded BLAS spin-waits (10x slower measured on 2 shared cores)."""
    global _BLAS
    if a.shape[0] * a.shape[1] * b.shape[1] > 20_000_000:
        return a @ b
    try:
        if _BLAS is None:
            from threadpoolctl import ThreadpoolController

            _BLAS = ThreadpoolController()
        with _BLAS.limit(limits=1, user_api="blas"):
            return a @ b
    except ImportError:
        return a @ b


def _decode(decode, tokens) -> list[str]:
    return [str(int(t)) for t in tokens] if decode is None else list(decode([int(t) for t in tokens]))


def _shown_matrix(pool: NegativePool, record: LatentRecord, ex: Examples, length: int, seed: int,
                  activating: bool) -> np.ndarray:
    """Embeddings standing for the windows: a pool window's whole-window vector (embedded once at build: free),
    else the display crop's, keyed (id, start, stop) and embedded on first use (half the text of a 64-token
    window, and the part of it around the peak that prompts show)."""
    starts = display_starts(ex, length, seed, activating=activating)
    whole = not length or length >= ex.tokens.shape[1]
    keys: list = [int(w) if whole or pool.built_with(w) else (int(w), int(a), int(a) + length)
                  for w, a in zip(ex.window_ids, starts)]
    row = {k: r for r, k in enumerate(keys)}

    def texts(missing: list) -> list[str]:
        out = []
        for k in missing:
            r = row[k]
            a, b = (k[1], k[2]) if isinstance(k, tuple) else (0, ex.tokens.shape[1])
            out.append(plain_text(record.token_strings(ex.tokens[r, a:b])))
        return out

    return pool.matrix(keys, texts)


def _texts_for(record: LatentRecord, ex: Examples) -> Callable[[list[int]], list[str]]:
    row = {int(w): k for k, w in enumerate(ex.window_ids)}
    return lambda ids: [plain_text(record.token_strings(ex.tokens[row[i]])) for i in ids]


# --------------------------------------------------------------------------------------------------- sampling


def _dedup(ex: Examples) -> Examples:
    _, first = np.unique(ex.window_ids, return_index=True)
    return ex.take(np.sort(first))


def _without(ex: Examples, ids: set[int]) -> Examples:
    if not ids:
        return ex
    keep = [k for k, w in enumerate(ex.window_ids) if int(w) not in ids]
    return ex.take(keep)


def quantile_of(max_acts: np.ndarray, top: float, n_q: int) -> np.ndarray:
    """Decile (n_q-ile) index by value: bin k holds max_act in (k/n_q·top, (k+1)/n_q·top]."""
    if top <= 0:
        return np.zeros(len(max_acts), np.int64)
    q = np.ceil(np.asarray(max_acts, np.float64) / top * n_q).astype(np.int64) - 1
    return np.clip(q, 0, n_q - 1)


def _stratified(bins: np.ndarray, n_q: int, n: int, keys: np.ndarray) -> np.ndarray:
    """n indices spread evenly over the bins (remainder to the highest bins); what a bin lacks is taken from
    the highest bins that still have spare members (high activations are the rarest and most informative)."""
    n = min(n, len(bins))
    members = [np.flatnonzero(bins == b) for b in range(n_q)]
    quota = np.full(n_q, n // n_q)
    quota[n_q - (n % n_q):] += 1 if n % n_q else 0
    take = np.minimum(quota, [len(m) for m in members])
    deficit = n - int(take.sum())
    while deficit > 0:
        b = max(b for b in range(n_q) if len(members[b]) > take[b])
        grow = min(deficit, len(members[b]) - int(take[b]))
        take[b] += grow
        deficit -= grow
    picked = [_smallest(keys, m, int(k)) for m, k in zip(members, take) if k]
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)


_SHARED: contextvars.ContextVar[dict | None] = contextvars.ContextVar("autointerp_shared_samples", default=None)


@contextlib.contextmanager
def shared_samples():
    """Inside this block `sample_latent` computes each sampling of a record once and hands the same LatentSample to
    every later caller (the job's units: warm-up, explainer, each scorer of one latent — four calls, one sampling).
    Keyed by the record and pool objects (held, so their ids stay theirs), config, seed, explain_negatives and
    exclude_ids; a call whose `exclude_ids` are all windows of the explainer set of the sampling without them gets
    that sampling (excluding them changes no set: they are never test windows or negatives anyway). Contextvars
    carry the block into tasks and `asyncio.to_thread`; pass `contextvars.copy_context().run` to other executors."""
    token = _SHARED.set({})
    try:
        yield
    finally:
        _SHARED.reset(token)


def sample_latent(
    record: LatentRecord,
    config: SamplingConfig = SamplingConfig(),
    seed: int = 0,
    *,
    pool: NegativePool | None = None,
    exclude_ids: Iterable[int] = (),
    explain_negatives: bool = True,
) -> LatentSample | Skipped:
    """The explainer/test/negative sets of one latent. `exclude_ids` (e.g. the window ids an explanation was
    made from) never enter the test set, whatever config produced them. `explain_negatives=False` leaves the
    contrastive explainer's negatives empty (and the explainer windows unembedded); no other set changes.
    Within `shared_samples()` a repeated sampling is computed once."""
    memo = _SHARED.get()
    if memo is None:
        return _sample_latent(record, config, seed, pool, exclude_ids, explain_negatives)
    exclude = frozenset(int(i) for i in exclude_ids)
    base = (id(record), id(pool), config, int(seed), bool(explain_negatives))
    for key in ((base, exclude), (base, frozenset())):
        hit = memo.get(key)
        if hit is not None and hit[0] is record and hit[1] is pool:
            s = hit[2]
            if key[1] == exclude or (isinstance(s, LatentSample)
                                     and exclude <= {int(i) for i in s.explain.window_ids}):
                return s
    s = _sample_latent(record, config, seed, pool, exclude, explain_negatives)
    memo[(base, exclude)] = (record, pool, s)
    return s


def _sample_latent(record: LatentRecord, config: SamplingConfig, seed: int, pool: NegativePool | None,
                   exclude_ids: Iterable[int], explain_negatives: bool) -> LatentSample | Skipped:
    cfg = config
    keys = lambda ex, salt: window_keys(ex.window_ids, seed, record.latent, salt)  # noqa: E731
    n_q = cfg.n_quantiles
    ctx = record.ctx_len
    parts = [p for p in (record.top, record.sample) if len(p)]
    acts_all = _dedup(Examples.concat(parts)) if parts else Examples.empty(ctx)
    acts_all = acts_all.take(np.flatnonzero(acts_all.max_acts > 0))
    n_act = len(acts_all)
    if n_act < cfg.min_explain + cfg.min_test:
        return Skipped(f"{n_act} activating windows (need {cfg.min_explain + cfg.min_test})", record.latent)
    top_act = float(acts_all.max_acts.max())
    exclude = {int(i) for i in exclude_ids}

    # explainer set: never more than what leaves min_test for testing
    n_explain = min(cfg.n_explain, n_act - cfg.min_test)
    top_ids = set()
    if cfg.explain_from in ("top", "mixed"):
        k = n_explain if cfg.explain_from == "top" else n_explain // 2
        top_src = _dedup(record.top) if len(record.top) else Examples.empty(ctx)
        top_src = top_src.take(np.flatnonzero(top_src.max_acts > 0))
        order = np.lexsort((top_src.window_ids, -top_src.max_acts))  # sorted by act desc, id asc
        top_part = top_src.take(order[:k])
        top_ids = {int(i) for i in top_part.window_ids}
    if cfg.explain_from == "top":
        explain = top_part
    else:
        src = _dedup(record.sample) if len(record.sample) else acts_all
        src = _without(src.take(np.flatnonzero(src.max_acts > 0)), top_ids)
        k = n_explain - len(top_ids)
        idx = _stratified(quantile_of(src.max_acts, top_act, n_q), n_q, k, keys(src, "explain"))
        q_part = src.take(idx)
        explain = Examples.concat([top_part, q_part]) if top_ids else q_part
        if not len(explain):
            explain = Examples.empty(ctx)
    if len(explain) < cfg.min_explain:
        return Skipped(f"{len(explain)} explainer examples (need {cfg.min_explain})", record.latent)

    # activating test set, stratified over value deciles
    explain_ids = {int(i) for i in explain.window_ids}
    cand = _without(acts_all, explain_ids | exclude)
    if len(cand) < cfg.min_test:
        return Skipped(f"{len(cand)} activating test windows left (need {cfg.min_test})", record.latent)
    q_all = quantile_of(cand.max_acts, top_act, n_q)
    idx = _stratified(q_all, n_q, cfg.n_test, keys(cand, "test"))
    test, test_q = cand.take(idx), q_all[idx]

    # negatives: hard ones (closest to the test windows) first, then random ones
    act_ids = {int(i) for i in acts_all.window_ids}
    neg_cand = _without(_dedup(record.negatives), act_ids | explain_ids | exclude) if len(record.negatives) else None
    n_neg_avail = len(neg_cand) if neg_cand is not None else 0
    if n_neg_avail < cfg.min_negatives:
        return Skipped(f"{n_neg_avail} non-activating pool windows (need {cfg.min_negatives})", record.latent)
    n_neg = min(cfg.n_negatives, n_neg_avail)
    n_hard = int(round(n_neg * cfg.hard_negative_fraction)) if pool is not None else 0
    d = cfg.display_ctx
    k_expl = min(cfg.n_explain_negatives, n_neg_avail - n_neg) if explain_negatives else 0
    neg_m, sims = None, None
    if pool is not None and (n_hard or k_expl):
        # whole pool windows (embedded once per run) against the test windows as displayed
        neg_m = pool.matrix(neg_cand.window_ids, _texts_for(record, neg_cand))
    if n_hard:
        sims = _dot(neg_m, _shown_matrix(pool, record, test, d, seed, True).T)  # [n_cand, n_test]
    chosen = np.zeros(0, np.int64)
    if n_hard:
        score = sims.max(axis=1)
        chosen = np.lexsort((neg_cand.window_ids, -score))[:n_hard]  # ties by id: deterministic
    rest = np.setdiff1d(np.arange(n_neg_avail), chosen)
    neg_keys = keys(neg_cand, "negatives")
    rand = _smallest(neg_keys, rest, n_neg - len(chosen))
    neg_idx = np.concatenate([chosen, np.sort(rand)]).astype(np.int64)
    negatives = neg_cand.take(neg_idx)
    is_hard = np.arange(len(neg_idx)) < len(chosen)

    # contrastive negatives: from what the test set left, hard w.r.t. the explainer windows when possible
    left = np.setdiff1d(np.arange(n_neg_avail), neg_idx)
    k = k_expl
    if k and pool is not None:
        sub = neg_cand.take(left)
        e_m = _shown_matrix(pool, record, explain, d, seed, True)
        s = _dot(neg_m[left], e_m.T).max(axis=1)
        e_idx = left[np.lexsort((sub.window_ids, -s))[:k]]
    else:
        e_idx = _smallest(neg_keys, left, k)
    explain_neg = neg_cand.take(e_idx)

    out = LatentSample(
        latent=record.latent,
        seed=seed,
        max_act=top_act,
        explain=explain,
        test=test,
        test_quantile=test_q,
        negatives=negatives,
        negative_is_hard=is_hard,
        explain_negatives=explain_neg,
        n_quantiles=n_q,
        display_ctx=d,
    )
    check_disjoint(out.explain_ids | exclude, out.test_ids, record.latent)
    return out


def check_disjoint(explain_ids: Iterable[int], test_ids: Iterable[int], latent: int = -1) -> None:
    both = set(int(i) for i in explain_ids) & set(int(i) for i in test_ids)
    if both:
        raise LeakageError(f"latent {latent}: windows {sorted(both)[:10]} are in both the explainer and test sets")
