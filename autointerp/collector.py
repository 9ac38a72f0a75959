"""The streaming collector: per-latent top-K windows, a uniform reservoir sample, statistics and a shared pool.

Memory is O(n_latents × (K + S)) slots plus the nonzero activations of the kept windows, and never grows with the
number of tokens. A kept window holds only the latent's nonzero positions and an 8-bit value relative to the
window's own max (the max itself is exact): a latent fires at a handful of positions of most windows, so this is
~2 bytes per firing token instead of 2 × ctx bytes per window. All state lives on the device the codes come from
(GPU when present) and every update is a handful of batched tensor ops per batch; nothing is of size
tokens × n_latents.

Both per-latent buffers are the same structure, a *keyed top-K*: the top windows use key = the window's max
activation; the uniform sample uses key = a hash of (window id, latent, seed), which makes "top-S by random key" a
reservoir sample that does not depend on batch boundaries (and needs no RNG state to resume). Ties in key are
broken by the lower window id, so results are exactly those of sorting all windows by (key desc, id asc).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass

import torch

from .cache import QMAX, hist_edges  # values are stored as round(v / window max × QMAX), >= 1 where it fires


@dataclass(frozen=True)
class CollectorConfig:
    # K and S cover what sampling draws: 20 explainer windows from the top, then 50 test windows over 10 deciles
    # of (top ∪ sample): the upper deciles come from the top windows left after the explainer set (30 at K=50),
    # the lower ones from the uniform sample (S=100: twice the 50 a test set takes). See docs/benchmarks.md.
    top_k: int = 50
    n_sample: int = 100
    pool_size: int = 1000
    seed: int = 0
    hist_bins: int = 80

    def as_dict(self) -> dict:
        return asdict(self)


log = logging.getLogger(__name__)
_M32 = 0xFFFFFFFF
SLOT_BYTES = 4 + 4 + 4 + 8 + 2  # key, window id, window max, arena offset, entry count
MERGE_BYTES = 48  # per element of one batch's [rows, K + B] merge: keys, sort values and indices, ids, slots


def planned_bytes(n_latents: int, ctx_len: int, cfg: CollectorConfig, nnz_per_token: int, n_tokens: int,
                  batch_windows: int, chunk_latents: int | None = None) -> dict[str, int]:
    """Upper bounds of the collector's memory in bytes: the fixed [n, K + S] slots and statistics, the entry arenas
    at their fullest, the pool's codes; and two transients: one batch's merge (rows = latents firing in the batch,
    or in one latent chunk of it) and the copies a checkpoint or the publish step makes of the filled slots
    ("state"). Also the counts they rest on: "kept" windows (filled slots) and "live" entries.

    A latent keeps at most min(K, windows the run sees) windows of at most ctx_len firing positions each, and all
    latents together no more windows or entries than the (token, latent) codes that fire, nnz_per_token per token;
    a rebuild holds the old and the new arena, hence 4 × live."""
    entry = (1 if ctx_len <= 256 else 2) + 1
    windows, fired = max(1, n_tokens // ctx_len), nnz_per_token * n_tokens
    kept = [min(n_latents * min(k, windows), fired) for k in (cfg.top_k, cfg.n_sample)]
    live = sum(min(w * ctx_len, fired) for w in kept)
    rows = min(n_latents, chunk_latents or n_latents, nnz_per_token * batch_windows * ctx_len)
    pool_pairs = min(cfg.pool_size, windows) * min(n_latents, nnz_per_token * ctx_len)
    return {"slots": n_latents * (cfg.top_k + cfg.n_sample) * SLOT_BYTES,
            "stats": n_latents * (20 + 4 * cfg.hist_bins), "arena": 4 * live * entry,
            "pool": pool_pairs * 6 + min(cfg.pool_size, windows) * 400,  # int32 latent + fp16 max; a dict entry
            "merge": rows * (max(cfg.top_k, cfg.n_sample) + batch_windows) * MERGE_BYTES,
            "state": sum(kept) * 16 + n_latents * (cfg.top_k + cfg.n_sample),  # filled slots' copies, the masks
            "kept": sum(kept), "live": live, "entry": entry, "pool_pairs": pool_pairs}


def hash_uniform(window_ids: torch.Tensor, latents: torch.Tensor, seed: int) -> torch.Tensor:
    """A deterministic uniform(0,1) float per (window, latent) pair (32-bit integer mix, murmur3-style finaliser);
    the two index tensors broadcast against each other."""
    x = (window_ids * 0x9E3779B1 + latents * 0x85EBCA77 + (seed * 0xC2B2AE3D + 0x27D4EB2F)) & _M32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    x = x ^ (x >> 16)
    return (x.to(torch.float64) + 0.5).div_(2.0**32).to(torch.float32)


def ranges(start: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    """The concatenation of arange(start[i], start[i] + length[i]) over i (int64)."""
    length = length.long()
    first = torch.cumsum(length, 0) - length
    total = int(length.sum())
    return torch.repeat_interleave(start.long() - first, length, output_size=total) + \
        torch.arange(total, device=start.device)


class DenseCodes:
    """Codes as one dense [B, T, n] tensor (any activation rule)."""

    def __init__(self, codes: torch.Tensor):
        self.codes = codes
        self.shape = codes.shape

    def window_pairs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(window index in batch, latent, max activation) of every (window, latent) pair that fires, sorted."""
        wmax = self.codes.amax(dim=1)
        b, lat = torch.nonzero(wmax > 0, as_tuple=True)
        return b, lat, wmax[b, lat]

    def nonzeros(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(latent, value) of every firing token; each latent's in (window, token) order."""
        bi, ti, li = torch.nonzero(self.codes > 0, as_tuple=True)
        return li, self.codes[bi, ti, li]

    def entries(self, b: torch.Tensor, lat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(pair, position, value) of latent lat[i]'s firing tokens in window b[i], sorted by (pair, position)."""
        # codes[b, :, lat] as one flat gather: advanced indexing around a slice takes a slow path (10x)
        _, t, n = self.codes.shape
        flat = (b * (t * n) + lat)[:, None] + torch.arange(t, device=b.device)[None, :] * n
        rows = self.codes.reshape(-1)[flat]
        pair, pos = torch.nonzero(rows > 0, as_tuple=True)
        return pair, pos, rows[pair, pos]


class NonzeroCodes:
    """Codes [B, T, n] as their firing entries only (window index, token, latent, float32 value), each latent's
    in (window, token) order: every operation costs O(entries), so a 1M-latent dictionary costs the collector no
    more than a 16k one of the same firing rate."""

    def __init__(self, b: torch.Tensor, tok: torch.Tensor, lat: torch.Tensor, val: torch.Tensor,
                 shape: tuple[int, int, int]):
        self.b, self.tok, self.lat, self.val = b, tok, lat, val
        self.shape, self.n = shape, shape[2]

    def window_pairs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pair, inv = torch.unique(self.b * self.n + self.lat, return_inverse=True)  # sorted by (window, latent)
        wmax = torch.zeros(pair.numel(), device=self.val.device).scatter_reduce_(0, inv, self.val, reduce="amax")
        return pair // self.n, pair % self.n, wmax

    def nonzeros(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lat, self.val

    def entries(self, b: torch.Tensor, lat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # Look every firing entry (window, token, latent) up among the wanted (window, latent) pairs: a sorted
        # search over m keys, O(entries · log m), instead of materialising the dense codes.
        if lat.numel() == 0:
            return (torch.zeros(0, dtype=torch.int64, device=self.val.device),) * 2 + (self.val[:0],)
        sorted_want, order = torch.sort(b * self.n + lat)
        have = self.b * self.n + self.lat
        at = torch.searchsorted(sorted_want, have).clamp_(max=lat.numel() - 1)
        hit = sorted_want[at] == have
        pair, tok, val = order[at[hit]], self.tok[hit], self.val[hit]
        srt = torch.argsort(pair * self.shape[1] + tok)
        return pair[srt], tok[srt], val[srt]


class SparseCodes(NonzeroCodes):
    """A top-k encoder's codes as (values, indices) [B, T, k], never expanded to [B, T, n]."""

    def __init__(self, values: torch.Tensor, indices: torch.Tensor, n_latents: int):
        self.values, self.indices = values.float(), indices
        b, tok, j = torch.nonzero(self.values > 0, as_tuple=True)
        super().__init__(b, tok, indices[b, tok, j], self.values[b, tok, j], (*values.shape[:2], n_latents))


class LatentChunks:
    """A batch's codes [B, T, n] from an encoder with no fixed number of nonzeros (relu, jumprelu, gated...), made
    one latent chunk at a time while the collector reads them: neither [B, T, n] nor its nonzeros exist at once.
    Every latent's buffers and statistics depend on its own codes only, so chunk by chunk collects exactly what
    the whole tensor would. `chunks` yields (token of the flattened [B, T], latent, value), chunks in latent
    order (see Dictionary.nonzero_chunks); read once. Positions in `ignore` [B, T] are dropped."""

    def __init__(self, chunks: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                 shape: tuple[int, int, int], ignore: torch.Tensor | None = None, nnz_bound: int | None = None):
        self.chunks, self.shape, self.ignore = chunks, shape, ignore
        self.nnz_bound = nnz_bound  # latents per token the memory plan assumed: the collector warns past it

    def parts(self, device) -> Iterator[NonzeroCodes]:
        keep = None if self.ignore is None else ~self.ignore.to(device).reshape(-1)
        for tok, lat, val in self.chunks:
            tok, lat, val = tok.to(device), lat.to(device), val.to(device)
            if keep is not None:
                kept = keep[tok]
                tok, lat, val = tok[kept], lat[kept], val[kept]
            yield NonzeroCodes(tok // self.shape[1], tok % self.shape[1], lat, val.float(), self.shape)


class KeyedTopK:
    """For every latent, the K windows with the highest key, with the latent's nonzero activations in them.

    Per slot [n, K], sorted (key desc, id asc): key, window id, the window's max activation of the latent, and
    where its entries are (offset, count) in an append-only arena of (position, 8-bit value) entries. An entering
    window appends its entries; an evicted one leaves garbage that is dropped when the arena is rebuilt, which
    happens only when it is full, into twice the live size: amortised O(1) per entry.
    """

    def __init__(self, n: int, k: int, ctx: int, device):
        self.k = k
        self.keys = torch.full((n, k), float("-inf"), device=device)
        self.ids = torch.full((n, k), -1, dtype=torch.int32, device=device)
        self.wmax = torch.zeros((n, k), device=device)
        self.off = torch.zeros((n, k), dtype=torch.int64, device=device)
        self.cnt = torch.zeros((n, k), dtype=torch.int16, device=device)
        pos_dtype = torch.uint8 if ctx <= 256 else torch.int16
        self.pos = torch.zeros(0, dtype=pos_dtype, device=device)
        self.q = torch.zeros(0, dtype=torch.uint8, device=device)
        self.used = 0  # arena entries written (live + garbage)
        self.live = 0  # entries the slots point at

    def update(self, b: torch.Tensor, lat: torch.Tensor, key: torch.Tensor, window_ids: torch.Tensor,
               codes: DenseCodes | NonzeroCodes) -> int:
        """Candidate (window index b, latent, key) pairs of one batch, window_ids [B] ascending. Returns rows
        changed."""
        k = self.k
        keep = key > self.keys[lat, -1]
        if not keep.any():
            return 0
        rows, r = torch.unique(lat[keep], return_inverse=True)
        m, nb = rows.numel(), window_ids.numel()
        new = torch.full((m, nb), float("-inf"), device=key.device)
        new[r, b[keep]] = key[keep]
        cat_keys = torch.cat([self.keys[rows], new], dim=1)  # [m, K+B]
        cat_ids = torch.cat([self.ids[rows], window_ids.to(torch.int32)[None, :].expand(m, nb)], dim=1)
        # stable sort: old entries (smaller ids, already in (key desc, id asc) order) precede new ones on ties,
        # and new ones are in window order, so the merge is exactly a global (key desc, id asc) sort. Old -inf
        # slots sort before new -inf ones, so every entering window really fires.
        order = torch.sort(cat_keys, dim=1, descending=True, stable=True).indices[:, :k]
        r_in, j_in = torch.nonzero(order >= k, as_tuple=True)
        pair, pos, val = codes.entries(order[r_in, j_in] - k, rows[r_in])
        n_in = r_in.numel()
        wmax_in = torch.zeros(n_in, device=val.device).scatter_reduce_(0, pair, val, reduce="amax")
        q = (val / wmax_in[pair] * QMAX).round_().clamp_(1, QMAX).to(torch.uint8)
        cnt_in = torch.bincount(pair, minlength=n_in)
        start = self._append(pos.to(self.pos.dtype), q)  # may rebuild the arena: offsets are read after it
        old, src = order < k, order.clamp(max=k - 1)
        off = torch.where(old, self.off[rows].gather(1, src), 0)
        cnt = torch.where(old, self.cnt[rows].gather(1, src), 0)
        wmax = torch.where(old, self.wmax[rows].gather(1, src), 0)
        off[r_in, j_in] = start + torch.cumsum(cnt_in, 0) - cnt_in
        cnt[r_in, j_in] = cnt_in.to(cnt.dtype)
        wmax[r_in, j_in] = wmax_in
        self.live += int(cnt.sum()) - int(self.cnt[rows].sum())
        self.keys[rows] = cat_keys.gather(1, order)
        self.ids[rows] = cat_ids.gather(1, order)
        self.wmax[rows], self.off[rows], self.cnt[rows] = wmax, off, cnt
        return m

    def _append(self, pos: torch.Tensor, q: torch.Tensor) -> int:
        """Write entries at the arena's end (rebuilding it first when full); returns where they start."""
        if self.used + pos.numel() > self.pos.numel():
            self._rebuild(2 * (self.live + pos.numel()))
        start = self.used
        self.pos[start:start + pos.numel()] = pos
        self.q[start:start + q.numel()] = q
        self.used += pos.numel()
        return start

    def _rebuild(self, capacity: int, chunk_slots: int = 1 << 21) -> None:
        """Copy the live entries into a fresh arena of `capacity`, in (row, slot) order, latent rows in chunks
        (bounded index memory). Only slots holding entries are indexed: with 1M latents most are empty, and a
        rebuild costs a scan of the counts plus O(live), not O(n × K) index work."""
        pos = torch.empty(capacity, dtype=self.pos.dtype, device=self.pos.device)
        q = torch.empty(capacity, dtype=torch.uint8, device=self.q.device)
        at, step = 0, max(1, chunk_slots // self.k)
        for r0 in range(0, self.keys.shape[0], step):
            cnt = self.cnt[r0:r0 + step].view(-1)
            full = torch.nonzero(cnt, as_tuple=True)[0]
            if full.numel() == 0:
                continue
            c, off = cnt[full].long(), self.off[r0:r0 + step].view(-1)  # off: a view, written through below
            src = ranges(off[full], c)
            pos[at:at + src.numel()] = self.pos[src]
            q[at:at + src.numel()] = self.q[src]
            off[full] = at + torch.cumsum(c, 0) - c  # empty slots keep stale offsets: nothing reads them
            at += src.numel()
        self.pos, self.q, self.used = pos, q, at

    def export(self, chunk_rows: int = 1 << 15):
        """The kept windows in key order, latent rows in chunks, as numpy: (windows per latent [r], window ids,
        window max, entries per window [s], positions, 8-bit values [e]); empty slots left out."""
        for r0 in range(0, self.keys.shape[0], chunk_rows):
            valid = self.ids[r0:r0 + chunk_rows] >= 0
            cnt = self.cnt[r0:r0 + chunk_rows][valid]
            src = ranges(self.off[r0:r0 + chunk_rows][valid], cnt)
            yield tuple(a.cpu().numpy() for a in (
                valid.sum(1), self.ids[r0:r0 + chunk_rows][valid], self.wmax[r0:r0 + chunk_rows][valid], cnt,
                self.pos[src], self.q[src]))

    def state(self) -> dict:
        """Filled slots only (each row's filled slots are a prefix: empty ones sort last), entries in slot order:
        a 1M-latent collector early in a run checkpoints megabytes, not its gigabytes of empty slots."""
        self._rebuild(self.live)  # live entries only, in (row, slot) order: offsets follow from the counts
        valid = self.ids >= 0
        return {"n_valid": valid.sum(1).to(torch.int16), "keys": self.keys[valid], "ids": self.ids[valid],
                "wmax": self.wmax[valid], "cnt": self.cnt[valid], "pos": self.pos, "q": self.q}

    def load_state(self, st: dict) -> None:
        dev = self.keys.device
        valid = torch.arange(self.k, device=dev)[None, :] < st["n_valid"].to(dev)[:, None].long()
        for name in ("keys", "ids", "wmax", "cnt"):
            getattr(self, name)[valid] = st[name].to(dev)
        cnt = st["cnt"].to(dev).long()
        self.off[valid] = torch.cumsum(cnt, 0) - cnt
        self.pos, self.q = st["pos"].to(dev), st["q"].to(dev)
        self.used = self.live = self.pos.numel()


class Collector:
    """Feed it batches of codes; it keeps everything the cache needs. `state()`/`load_state()` for resume."""

    def __init__(self, n_latents: int, ctx_len: int, config: CollectorConfig, device):
        from .errors import ConfigError

        if config.top_k < 1 or config.n_sample < 1 or config.pool_size < 0:
            raise ConfigError(f"--top-k and --n-sample must be >= 1 and --pool-size >= 0 (got {config.top_k}, "
                              f"{config.n_sample}, {config.pool_size})")
        self.cfg = config
        self.n = n_latents
        self.device = torch.device(device)
        self.top = KeyedTopK(n_latents, config.top_k, ctx_len, self.device)
        self.sample = KeyedTopK(n_latents, config.n_sample, ctx_len, self.device)
        self.n_active = torch.zeros(n_latents, dtype=torch.int64, device=self.device)
        self.act_sum = torch.zeros(n_latents, dtype=torch.float64, device=self.device)
        self.act_max = torch.zeros(n_latents, dtype=torch.float32, device=self.device)
        self.edges = torch.tensor(hist_edges(config.hist_bins), device=self.device, dtype=torch.float32)
        # int32 halves the largest per-latent array; widened before any bin could pass 2**31 - 1
        self.hist = torch.zeros((n_latents, config.hist_bins), dtype=torch.int32, device=self.device)
        # the shared pool: a reservoir over windows (key = hash(window, -1)), each with its firing latents
        self.pool_keys = torch.empty(0, device=self.device)
        self.pool_ids = torch.empty(0, dtype=torch.int64, device=self.device)
        self.pool_codes: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # window id -> (latents, max acts)
        self.n_tokens = 0
        self.n_windows = 0
        self._warned_nnz = False

    @torch.no_grad()
    def update(self, codes: torch.Tensor | DenseCodes | SparseCodes | LatentChunks, window_ids: torch.Tensor) -> None:
        """codes of [B, T, n]: a dense float tensor, SparseCodes from a top-k encoder (the same values, read
        from k entries per token instead of a scan of all n), or LatentChunks (the same values, a latent chunk at
        a time); window_ids [B] int64 ascending."""
        if isinstance(codes, torch.Tensor):
            codes = DenseCodes(codes.to(self.device).float())
        window_ids = window_ids.to(self.device)
        b, t, _ = codes.shape
        if self.n_tokens + b * t >= 2**31 and self.hist.dtype == torch.int32:
            self.hist = self.hist.long()
        admitted = self._pool_admit(window_ids)  # pool keys depend on the window only: known before any code
        first = int(window_ids[0])
        pool_parts: dict[int, list] = {wid: [] for wid in admitted}
        fired = 0
        for part in codes.parts(self.device) if isinstance(codes, LatentChunks) else (codes,):
            bi, lat, wmax, n_fired = self._update_part(part, window_ids)
            fired += n_fired
            for wid, got in pool_parts.items():
                here = bi == wid - first  # pairs are sorted by (window, latent): latents come out ascending
                got.append((lat[here].to(torch.int32), wmax[here].to(torch.float16)))
        for wid, got in pool_parts.items():  # chunks come in latent order: each window's latents stay ascending
            self.pool_codes[wid] = (torch.cat([g[0] for g in got]), torch.cat([g[1] for g in got]))
        bound = getattr(codes, "nnz_bound", None)
        if bound and fired > bound * b * t and not self._warned_nnz:
            self._warned_nnz = True
            log.warning("the dictionary fires at %.0f latents per token (a batch's mean), over the %d the memory plan "
                        "assumed for it: the kept activations may outgrow the planned memory", fired / (b * t), bound)
        self.n_tokens += b * t
        self.n_windows += b

    def _update_part(self, codes: DenseCodes | NonzeroCodes, window_ids: torch.Tensor):
        """Buffers and statistics of the latents in `codes`; returns its firing (window, latent, max) pairs and
        how many tokens × latents fire."""
        bi, lat, wmax = codes.window_pairs()  # only the (window, latent) pairs that fire: a few % of B × n
        self.top.update(bi, lat, wmax, window_ids, codes)
        self.sample.update(bi, lat, hash_uniform(window_ids[bi], lat, self.cfg.seed), window_ids, codes)
        li, vals = codes.nonzeros()  # statistics over firing tokens only
        self.n_active.index_add_(0, li, torch.ones_like(li))
        self.act_sum.index_add_(0, li, vals.double())  # each latent's values in (window, token) order, as one pass
        self.act_max.scatter_reduce_(0, lat, wmax, reduce="amax")
        bins = (torch.bucketize(vals, self.edges, right=True) - 1).clamp_(0, self.cfg.hist_bins - 1)
        self.hist.view(-1).index_add_(0, li * self.cfg.hist_bins + bins, torch.ones_like(li, dtype=self.hist.dtype))
        return bi, lat, wmax, li.numel()

    def _pool_admit(self, window_ids: torch.Tensor) -> list[int]:
        """Let this batch's windows into the pool reservoir (drops the evicted ones' codes); returns the windows
        that entered, whose firing latents the batch's codes then fill in."""
        if self.cfg.pool_size <= 0:
            return []
        keys = hash_uniform(window_ids, torch.tensor(-1, device=self.device), self.cfg.seed + 7919)
        all_keys = torch.cat([self.pool_keys, keys])
        all_ids = torch.cat([self.pool_ids, window_ids])
        order = torch.sort(all_keys, descending=True, stable=True).indices[: self.cfg.pool_size]
        self.pool_keys, self.pool_ids = all_keys[order], all_ids[order]
        keep = set(self.pool_ids.tolist())
        for wid in [w for w in self.pool_codes if w not in keep]:
            del self.pool_codes[wid]
        first = int(window_ids[0])
        return sorted(w for w in keep if w not in self.pool_codes and w >= first)

    def state(self) -> dict:
        return {
            "top": self.top.state(), "sample": self.sample.state(),
            "n_active": self.n_active, "act_sum": self.act_sum, "act_max": self.act_max, "hist": self.hist,
            "pool_keys": self.pool_keys, "pool_ids": self.pool_ids, "pool_codes": self.pool_codes,
            "n_tokens": self.n_tokens, "n_windows": self.n_windows,
        }

    def load_state(self, st: dict) -> None:
        self.top.load_state(st["top"])
        self.sample.load_state(st["sample"])
        self.hist = st["hist"].to(self.device)
        for name in ("n_active", "act_sum", "act_max"):
            getattr(self, name).copy_(st[name])
        self.pool_keys = st["pool_keys"].to(self.device)
        self.pool_ids = st["pool_ids"].to(self.device)
        self.pool_codes = {int(k): (v[0].to(self.device), v[1].to(self.device)) for k, v in st["pool_codes"].items()}
        self.n_tokens, self.n_windows = int(st["n_tokens"]), int(st["n_windows"])
