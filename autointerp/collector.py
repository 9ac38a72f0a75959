"""The streaming collector: per-latent top-K windows, a uniform reservoir sample, statistics and a shared pool.

Memory is O(n_latents × (K + S) × ctx_len) and never grows with the number of tokens. All state lives on the
device the codes come from (GPU when present) and every update is a handful of batched tensor ops per batch.

Both per-latent buffers are the same structure, a *keyed top-K*: the top windows use key = the window's max
activation; the uniform sample uses key = a hash of (window id, latent, seed), which makes "top-S by random key" a
reservoir sample that does not depend on batch boundaries (and needs no RNG state to resume). Ties in key are
broken by the lower window id, so results are exactly those of sorting all windows by (key desc, id asc).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .cache import hist_edges


@dataclass(frozen=True)
class CollectorConfig:
    top_k: int = 100
    n_sample: int = 200
    pool_size: int = 1000
    seed: int = 0
    hist_bins: int = 80

    def as_dict(self) -> dict:
        return asdict(self)


_M32 = 0xFFFFFFFF


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


class DenseCodes:
    """Codes as one dense [B, T, n] tensor (any activation rule)."""

    def __init__(self, codes: torch.Tensor):
        self.codes = codes
        self.shape = codes.shape

    def window_max(self) -> torch.Tensor:
        """[B, n]: each window's max activation per latent."""
        return self.codes.amax(dim=1)

    def nonzeros(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(latent, value) of every firing token."""
        bi, ti, li = torch.nonzero(self.codes > 0, as_tuple=True)
        return li, self.codes[bi, ti, li]

    def rows(self, b: torch.Tensor, lat: torch.Tensor) -> torch.Tensor:
        """[m, T]: latent lat[i]'s per-token activations in window b[i]."""
        # codes[b, :, lat] as one flat gather: advanced indexing around a slice takes a slow path (10x)
        _, t, n = self.codes.shape
        flat = (b * (t * n) + lat)[:, None] + torch.arange(t, device=b.device)[None, :] * n
        return self.codes.reshape(-1)[flat]


class SparseCodes:
    """A top-k encoder's codes as (values, indices) [B, T, k], never expanded to [B, T, n]: every operation costs
    O(B·T·k), so a 1M-latent dictionary costs the collector no more than a 16k one, and no dense [B, T, n] buffer
    is written (on CPU that buffer's memset alone was ~3% of the forward pass for 16k latents)."""

    def __init__(self, values: torch.Tensor, indices: torch.Tensor, n_latents: int):
        self.values, self.indices, self.n = values.float(), indices, n_latents
        self.shape = (*values.shape[:2], n_latents)

    def window_max(self) -> torch.Tensor:
        b = self.values.shape[0]
        return torch.zeros(b, self.n, device=self.values.device).scatter_reduce_(
            1, self.indices.reshape(b, -1), self.values.reshape(b, -1), reduce="amax")

    def nonzeros(self) -> tuple[torch.Tensor, torch.Tensor]:
        nz = self.values > 0
        return self.indices[nz], self.values[nz]

    def rows(self, b: torch.Tensor, lat: torch.Tensor) -> torch.Tensor:
        # Look every stored entry (window, token, latent) up among the wanted (window, latent) pairs: a sorted
        # search over m keys, O(B·T·k·log m), instead of materialising the dense codes.
        bsz, t, k = self.indices.shape
        dev = self.indices.device
        out = torch.zeros(lat.numel(), t, device=dev)
        if lat.numel() == 0:
            return out
        want = b * self.n + lat  # unique: one entering window per (window, latent)
        sorted_want, order = torch.sort(want)
        have = (torch.arange(bsz, device=dev)[:, None, None] * self.n + self.indices).reshape(-1)
        pos = torch.searchsorted(sorted_want, have).clamp_(max=want.numel() - 1)
        hit = sorted_want[pos] == have
        tok = torch.arange(t, device=dev)[None, :, None].expand(bsz, t, k).reshape(-1)
        out[order[pos[hit]], tok[hit]] = self.values.reshape(-1)[hit]  # top-k indices are unique per token
        return out


class KeyedTopK:
    """For every latent, the K windows with the highest key, with the latent's per-token activations in them.

    keys/ids are kept sorted (key desc, id asc) — cheap, [n, K]. The big per-token array `acts` [n, K, T] is
    never permuted: each entry points at a storage slot, and an entering window takes the slot of one it evicts.
    """

    def __init__(self, n: int, k: int, ctx: int, device, act_dtype=torch.float16):
        self.k = k
        self.keys = torch.full((n, k), float("-inf"), device=device)
        self.ids = torch.full((n, k), -1, dtype=torch.int64, device=device)
        self.slots = torch.arange(k, device=device).repeat(n, 1)
        self.acts = torch.zeros((n, k, ctx), dtype=act_dtype, device=device)

    def update(self, new_keys: torch.Tensor, window_ids: torch.Tensor, codes: DenseCodes | SparseCodes) -> int:
        """new_keys [B, n] (-inf = not eligible), window_ids [B] ascending, codes of [B, T, n]. Returns rows changed."""
        k = self.k
        thresh = self.keys[:, -1]
        rows = torch.nonzero((new_keys > thresh).any(0)).squeeze(1)
        if rows.numel() == 0:
            return 0
        b = new_keys.shape[0]
        cat_keys = torch.cat([self.keys[rows], new_keys[:, rows].T], dim=1)  # [m, K+B]
        cat_ids = torch.cat([self.ids[rows], window_ids[None, :].expand(rows.numel(), b)], dim=1)
        # stable sort: old entries (smaller ids, already in (key desc, id asc) order) precede new ones on ties,
        # and new ones are in window order, so the merge is exactly a global (key desc, id asc) sort.
        order = torch.sort(cat_keys, dim=1, descending=True, stable=True).indices[:, :k]
        old_slots = self.slots[rows]
        slots = torch.where(order < k, old_slots.gather(1, order.clamp(max=k - 1)), -1)
        kept = torch.zeros_like(cat_keys, dtype=torch.bool).scatter_(1, order, True)
        r_ev, p_ev = torch.nonzero(~kept[:, :k], as_tuple=True)  # freed slots, row-major
        r_in, j_in = torch.nonzero(order >= k, as_tuple=True)  # entering windows, row-major: counts match per row
        free = old_slots[r_ev, p_ev]
        slots[r_in, j_in] = free
        lat = rows[r_in]
        bidx = order[r_in, j_in] - k
        self.acts[lat, free] = codes.rows(bidx, lat).to(self.acts.dtype)
        self.keys[rows] = cat_keys.gather(1, order)
        self.ids[rows] = cat_ids.gather(1, order)
        self.slots[rows] = slots
        return int(rows.numel())

    def sorted_acts(self) -> torch.Tensor:
        """acts in key order [n, K, T], on the CPU (done once at the end; no second copy on the GPU)."""
        acts, slots = self.acts.cpu(), self.slots.cpu()
        return acts.gather(1, slots[:, :, None].expand(-1, -1, acts.shape[2]))

    def state(self) -> dict:
        return {"keys": self.keys, "ids": self.ids, "slots": self.slots, "acts": self.acts}

    def load_state(self, st: dict) -> None:
        for name, val in st.items():
            getattr(self, name).copy_(val)


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
        self.hist = torch.zeros((n_latents, config.hist_bins), dtype=torch.int64, device=self.device)
        # the shared pool: a reservoir over windows (key = hash(window, -1)), each with its firing latents
        self.pool_keys = torch.empty(0, device=self.device)
        self.pool_ids = torch.empty(0, dtype=torch.int64, device=self.device)
        self.pool_codes: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # window id -> (latents, max acts)
        self.n_tokens = 0
        self.n_windows = 0

    @torch.no_grad()
    def update(self, codes: torch.Tensor | DenseCodes | SparseCodes, window_ids: torch.Tensor) -> None:
        """codes of [B, T, n]: a dense float tensor, or SparseCodes from a top-k encoder (the same values, read
        from k entries per token instead of a scan of all n latents); window_ids [B] int64 ascending."""
        if isinstance(codes, torch.Tensor):
            codes = DenseCodes(codes.to(self.device).float())
        window_ids = window_ids.to(self.device)
        b, t, _ = codes.shape
        wmax = codes.window_max()  # [B, n]
        active = wmax > 0
        self.top.update(torch.where(active, wmax, float("-inf")), window_ids, codes)
        # the reservoir keys, hashed only for the (window, latent) pairs that fire (a few % of B × n)
        bi, li = torch.nonzero(active, as_tuple=True)
        rnd = torch.full_like(wmax, float("-inf"))
        rnd[bi, li] = hash_uniform(window_ids[bi], li, self.cfg.seed)
        self.sample.update(rnd, window_ids, codes)
        li, vals = codes.nonzeros()  # statistics over firing tokens only
        self.n_active += torch.bincount(li, minlength=self.n)
        self.act_sum.index_add_(0, li, vals.double())
        self.act_max = torch.maximum(self.act_max, wmax.amax(0))
        bins = (torch.bucketize(vals, self.edges, right=True) - 1).clamp_(0, self.cfg.hist_bins - 1)
        self.hist.view(-1).index_add_(0, li * self.cfg.hist_bins + bins, torch.ones_like(li))
        self._update_pool(window_ids, wmax)
        self.n_tokens += b * t
        self.n_windows += b

    def _update_pool(self, window_ids: torch.Tensor, wmax: torch.Tensor) -> None:
        if self.cfg.pool_size <= 0:
            return
        keys = hash_uniform(window_ids, torch.tensor(-1, device=self.device), self.cfg.seed + 7919)
        all_keys = torch.cat([self.pool_keys, keys])
        all_ids = torch.cat([self.pool_ids, window_ids])
        order = torch.sort(all_keys, descending=True, stable=True).indices[: self.cfg.pool_size]
        self.pool_keys, self.pool_ids = all_keys[order], all_ids[order]
        keep = set(self.pool_ids.tolist())
        for wid in [w for w in self.pool_codes if w not in keep]:
            del self.pool_codes[wid]
        first = int(window_ids[0])
        for wid in keep:
            if wid not in self.pool_codes and wid >= first:
                row = wmax[wid - first]
                lat = torch.nonzero(row > 0).squeeze(1)
                self.pool_codes[wid] = (lat.to(torch.int32), row[lat].to(torch.float16))

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
        for name in ("n_active", "act_sum", "act_max", "hist"):
            getattr(self, name).copy_(st[name])
        self.pool_keys = st["pool_keys"].to(self.device)
        self.pool_ids = st["pool_ids"].to(self.device)
        self.pool_codes = {int(k): (v[0].to(self.device), v[1].to(self.device)) for k, v in st["pool_codes"].items()}
        self.n_tokens, self.n_windows = int(st["n_tokens"]), int(st["n_windows"])
