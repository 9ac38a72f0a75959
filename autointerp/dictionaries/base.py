"""The one Dictionary interface used by the collector: encode activations into dense latent codes.

Every checkpoint format is loaded into one of two classes:
  * LinearDictionary: an affine encoder + activation (all SAE / transcoder formats);
  * NeuronDictionary: the identity (raw neurons) or its top-k sparsification.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from autointerp.errors import ConfigError

# Activation rules, named by what they do (the format loaders pick one):
#   relu        relu(pre)                                   SAELens standard / transcoder
#   tanh_relu   tanh(relu(pre))                             SAELens pre-6.0 "tanh-relu"
#   relu_topk   top-k of relu(pre)                          sparsify topk (ReLU first)
#   topk_relu   relu of the top-k of pre                    SAELens topk (top-k first)
#   groupmax    max of relu(pre) within k contiguous groups sparsify groupmax
#   jumprelu    relu(pre) * (pre > threshold)               SAELens jumprelu, Gemma Scope
#   gated       (x W + b_gate > 0) * relu(x W e^r_mag + b_mag)  SAELens gated
#   abstopk     the k pre-activations of largest |pre|, sign kept   AbsTopK (a signed dictionary)
ACTIVATIONS = ("relu", "tanh_relu", "relu_topk", "topk_relu", "groupmax", "jumprelu", "gated", "abstopk")

# Bytes of pre-activations one encode step may hold (counted at 4 bytes a code, whatever the encode dtype): tokens ×
# n_latents never exists at once (a batch of 2048 tokens through a 1M-latent encoder would be 8 GiB in fp32). Top-k
# encoders step over tokens, the others over latents (`nonzero_chunks`). 16k latents fit a whole batch, as before.
ENCODE_CHUNK_BYTES = 256 << 20

# Latents a token fires at, as the memory plan assumes for rules with no fixed count (relu, jumprelu, gated...):
# trained sparse dictionaries fire at tens to a few hundred per token (Gemma Scope's L0 targets are ~10-300, SAELens
# ReLU SAEs similar), so 1024 leaves room. Only the plan reads it (kept windows and entries, the pool, per-chunk
# nonzeros); the encode and the collector never depend on it, and the collector warns when a batch fires at more.
DENSE_NNZ_PER_TOKEN = 1024
TOPK_RULES = ("relu_topk", "topk_relu", "abstopk")


def _unloaded(t: Tensor) -> int:
    """Bytes of t's storage not mapped into this process's memory yet (the present bits of /proc/self/pagemap),
    on the CPU; 0 elsewhere. (mincore would not do: it says whether the file is cached, not whether it is ours.)"""
    if t.device.type != "cpu" or t.untyped_storage().nbytes() < 1 << 20:  # small ones: not worth a look
        return 0
    store = t.untyped_storage()
    page = os.sysconf("SC_PAGE_SIZE")
    first, last = store.data_ptr() // page, (store.data_ptr() + store.nbytes() - 1) // page
    try:
        with open("/proc/self/pagemap", "rb") as f:
            f.seek(first * 8)
            entries = np.frombuffer(f.read((last - first + 1) * 8), dtype=np.uint64)
    except OSError:  # not Linux: count it all, the safe side for a plan
        return store.nbytes()
    resident = int(((entries >> np.uint64(63)) & np.uint64(1)).sum()) * page
    return max(0, store.nbytes() - resident)


def _chunk_bytes(tokens: int, latents: int, elem: int, nnz: int) -> int:
    """Bytes a chunk of codes [tokens, latents] costs at once, as a bound over the rules: up to three buffers at
    `elem` bytes (pre-activations and a rule's temporaries) and two boolean masks; then the indices and value of
    each nonzero code as the collector reads them (~40 bytes)."""
    return tokens * latents * (3 * elem + 2) + tokens * min(nnz, latents) * 40


class Dictionary:
    """Common metadata and the encode contract. Codes are dense float32 [..., n_latents]."""

    format: str
    source: str  # what the user passed (path or hub id)
    id: str  # stable: "<format>:<resolved path or hub id>"
    hookpoint: str | None
    transcoder: bool  # True: feed the INPUT of the hookpoint module (codes predict its output)
    d_in: int
    d_out: int
    n_latents: int
    log_sparsity: Tensor | None = None
    input_hookpoint: str | None = None  # SAELens transcoders: the activation read directly, when known
    cfg: dict[str, Any]
    # Signed dictionaries (AbsTopK, ITDA, raw neurons) write negative codes too: each latent has a positive and a
    # negative pole. The extraction collects them as 2 × n_latents unsigned units (`Poles`).
    signed: bool = False

    def encode(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def decode(self, codes: Tensor) -> Tensor:
        """codes [..., n_latents] -> what the dictionary writes [..., d_out] (decoder rows weighted by the codes plus
        the decoder bias), in the space `encode` reads after its own input normalisation (see `reconstruct`)."""
        raise NotImplementedError

    def reconstruct(self, x: Tensor) -> Tensor:
        """The dictionary's reconstruction of x [..., d_in] in x's own space (for a transcoder: its prediction of
        the hookpoint module's output [..., d_out]), float32."""
        return self.decode(self.encode(x)).float()

    def encode_topk(self, x: Tensor) -> tuple[Tensor, Tensor] | None:
        """For top-k encoders: (values, indices) [..., k], the same codes as `encode` without the dense
        [..., n_latents] tensor (the collector reads k entries per token instead of scanning all n). None for
        encoders with no fixed number of nonzeros per token."""
        return None

    def nonzero_chunks(self, x: Tensor) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """The nonzero codes of `encode(x)` one latent chunk at a time, never [tokens, n_latents] at once past
        ENCODE_CHUNK_BYTES: (token, latent, value) with tokens indexing x's flattened leading dims, chunks in
        latent order, each sorted by (token, latent), values in the encode dtype."""
        codes = self.encode(x).reshape(-1, self.n_latents)
        tok, lat = torch.nonzero(codes != 0 if self.signed else codes > 0, as_tuple=True)
        yield tok, lat, codes[tok, lat]

    def nnz_bound(self) -> int:
        """The most latents one token fires at, as far as the memory plan assumes (see DENSE_NNZ_PER_TOKEN)."""
        return self.n_latents

    def encode_bytes(self, tokens: int) -> tuple[int, int]:
        """(bytes that encoding `tokens` for the collector holds at once, latents per chunk), for the memory plan."""
        return _chunk_bytes(tokens, self.n_latents, 4, self.nnz_bound()), self.n_latents

    def unloaded_bytes(self) -> int:
        """Bytes of the encoder's weights not in memory yet: a safetensors file is mapped, not read, so a process's
        resident size misses the weights until the first encode pages them in (the memory plan adds them)."""
        return 0

    def decoder_directions(self) -> Tensor:
        raise NotImplementedError

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "Dictionary":
        raise NotImplementedError

    def _check_input(self, x: Tensor) -> None:
        if x.shape[-1] != self.d_in:
            raise ConfigError(
                f"{self.id}: encode got activations with last dim {x.shape[-1]}, expected d_in={self.d_in}"
                f" (hookpoint {self.hookpoint!r})"
            )

    def __repr__(self) -> str:
        kind = "transcoder" if self.transcoder else "dictionary"
        return (
            f"<{type(self).__name__} {kind} {self.id} hookpoint={self.hookpoint!r} "
            f"d_in={self.d_in} d_out={self.d_out} n_latents={self.n_latents}>"
        )


class LinearDictionary(Dictionary):
    """pre = (norm(x) - b_dec?) @ W_encᵀ + b_enc, then one of ACTIVATIONS.

    W_enc is kept as rows [n_latents, d_in] (sparsify layout; SAELens/Gemma Scope arrays are passed transposed,
    as views, so a large checkpoint is never copied).
    """

    def __init__(
        self,
        *,
        format: str,
        source: str,
        id: str,
        hookpoint: str | None,
        transcoder: bool,
        W_enc: Tensor,  # [n_latents, d_in]
        b_enc: Tensor | None,  # [n_latents]
        W_dec: Tensor,  # [n_latents, d_out]
        b_dec: Tensor,  # [d_out]
        activation: str,
        k: int | None = None,
        threshold: Tensor | None = None,
        b_gate: Tensor | None = None,
        b_mag: Tensor | None = None,
        r_mag: Tensor | None = None,
        subtract_b_dec: bool = False,
        input_norm: str = "none",  # none | constant_norm_rescale | layer_norm
        input_scale: float | None = None,  # folded SAELens expected_average_only_in factor
        rescale_by_decoder_norm: bool = False,
        architecture: str = "",
        cfg: dict[str, Any] | None = None,
        log_sparsity: Tensor | None = None,
        input_hookpoint: str | None = None,
        W_skip: Tensor | None = None,  # skip transcoders: [d_out, d_in], the output adds x @ W_skipᵀ
    ):
        assert activation in ACTIVATIONS, activation
        self.format, self.source, self.id = format, source, id
        self.hookpoint, self.transcoder = hookpoint, transcoder
        self.n_latents, self.d_in = int(W_enc.shape[0]), int(W_enc.shape[1])
        self.d_out = int(W_dec.shape[1])
        self.activation, self.k, self.architecture = activation, k, architecture
        self.subtract_b_dec, self.input_norm, self.input_scale = subtract_b_dec, input_norm, input_scale
        self.rescale_by_decoder_norm = rescale_by_decoder_norm
        self.cfg = cfg or {}
        self.log_sparsity = log_sparsity
        self.input_hookpoint = input_hookpoint
        self.signed = activation == "abstopk"
        self._t: dict[str, Tensor | None] = dict(
            W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec, threshold=threshold, b_gate=b_gate, b_mag=b_mag,
            r_mag=r_mag, W_skip=W_skip,
        )
        # W_dec may come as stored (a mapped file): it takes the encoder's device and dtype when first read, so an
        # extraction, which never reads it, never holds a converted copy (1.2 GB for 1M latents in bf16)
        self._dec_as = (W_enc.device, W_enc.dtype)
        self._derive()

    def _derive(self) -> None:
        t = self._t
        # Precomputed once per device/dtype: the decoder row norms and the gated magnitude scale.
        t["dec_norm"] = self.decoder_directions().norm(dim=-1) if self.rescale_by_decoder_norm else None
        t["mag_scale"] = t["r_mag"].exp() if t["r_mag"] is not None else None

    @property
    def dtype(self) -> torch.dtype:
        return self._t["W_enc"].dtype

    @property
    def device(self) -> torch.device:
        return self._t["W_enc"].device

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "LinearDictionary":
        for name, v in self._t.items():
            if v is not None and name not in ("dec_norm", "mag_scale", "W_dec"):
                self._t[name] = v.to(device=device or v.device, dtype=dtype or v.dtype)
        self._dec_as = (device or self._dec_as[0], dtype or self._dec_as[1])
        self._derive()
        return self

    def decoder_directions(self) -> Tensor:
        dev, dtype = self._dec_as
        self._t["W_dec"] = self._t["W_dec"].to(device=dev, dtype=dtype)  # the same tensor once converted
        return self._t["W_dec"]

    @torch.no_grad()
    def decode(self, codes: Tensor) -> Tensor:
        t = self._t
        W_dec = self.decoder_directions()
        codes = codes.to(device=W_dec.device, dtype=W_dec.dtype)
        if t["dec_norm"] is not None:  # SAELens topk decode: the codes were scaled by the decoder norms on the way in
            codes = codes / t["dec_norm"].clamp(min=torch.finfo(codes.dtype).tiny)  # a zero row's codes are 0
        return codes @ W_dec + t["b_dec"]

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """decode(encode(x)) with the encoder's input normalisation undone on the way out (SAELens'
        run_time_activation_norm_fn_out), plus the skip connection of a skip transcoder."""
        t = self._t
        x = x.to(device=self.device, dtype=self.dtype)
        out = self.decode(self.encode(x))
        # SAELens transcoders never undo it (their output lives in another space); its layer_norm undo has no eps
        if self.input_norm == "constant_norm_rescale" and not self.transcoder:
            out = out / (math.sqrt(self.d_in) / x.norm(dim=-1, keepdim=True))
        elif self.input_norm == "layer_norm" and not self.transcoder:
            mu = x.mean(dim=-1, keepdim=True)
            out = out * (x - mu).std(dim=-1, keepdim=True) + mu
        if self.input_scale is not None:
            out = out / self.input_scale
        if t["W_skip"] is not None:
            out = out + F.linear(x, t["W_skip"].to(x.dtype))
        return out.float()

    def encoder_weight(self) -> Tensor:
        """Encoder rows [n_latents, d_in] (useful for diagnostics)."""
        return self._t["W_enc"]

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        if self.activation in TOPK_RULES:
            vals, idx = self.encode_topk(x)
            return torch.zeros((*x.shape[:-1], self.n_latents), device=vals.device).scatter_(-1, idx, vals)
        return self._activate(self._prepare(x), slice(None)).float()

    @torch.no_grad()
    def encode_topk(self, x: Tensor) -> tuple[Tensor, Tensor] | None:
        if self.activation not in TOPK_RULES:
            return None
        rows = max(1, ENCODE_CHUNK_BYTES // (4 * self.n_latents))
        flat = x.reshape(-1, x.shape[-1])
        if flat.shape[0] <= rows:
            return self._topk(self._prepare(x))
        parts = [self._topk(self._prepare(chunk)) for chunk in flat.split(rows)]  # rows are independent
        shape = (*x.shape[:-1], self.k)
        return torch.cat([p[0] for p in parts]).view(shape), torch.cat([p[1] for p in parts]).view(shape)

    @torch.no_grad()
    def nonzero_chunks(self, x: Tensor) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        if self.activation in TOPK_RULES:  # a token's top-k needs all its latents at once: see encode_topk
            yield from super().nonzero_chunks(x)
            return
        x = self._prepare(x).reshape(-1, self.d_in)
        step = self._chunk_latents(x.shape[0])
        for l0 in range(0, self.n_latents, step):  # latent columns are independent: the same codes as one pass
            sl = slice(l0, l0 + step)
            if self.activation in ("relu", "jumprelu"):
                # the code is pre itself where pre > max(threshold, 0): no pass to write the codes out densely
                pre = self._pre(x, sl)
                cut = self._t["threshold"][sl].clamp(min=0) if self.activation == "jumprelu" else 0
                tok, lat = torch.nonzero(pre > cut, as_tuple=True)
                yield tok, lat + l0, pre[tok, lat]
            else:
                codes = self._activate(x, sl)
                tok, lat = torch.nonzero(codes > 0, as_tuple=True)
                yield tok, lat + l0, codes[tok, lat]

    def unloaded_bytes(self) -> int:
        # the decoder is left out: encoding never reads it, so a mapped one never comes into memory
        return sum(_unloaded(v) for name, v in self._t.items() if v is not None and name != "W_dec")

    def _chunk_latents(self, tokens: int) -> int:
        step = max(1, ENCODE_CHUNK_BYTES // (4 * max(1, tokens)))
        if self.activation == "groupmax":  # whole groups only: a group's max needs all its latents
            group = self.n_latents // self.k
            step = max(group, step // group * group)
        return min(step, self.n_latents)

    def nnz_bound(self) -> int:
        if self.activation in (*TOPK_RULES, "groupmax"):
            return min(self.k, self.n_latents)
        return min(self.n_latents, DENSE_NNZ_PER_TOKEN)

    def encode_bytes(self, tokens: int) -> tuple[int, int]:
        n, elem = self.n_latents, self.dtype.itemsize
        if self.activation in TOPK_RULES:  # token chunks of pre-activations and their top-k; then the codes
            return 2 * min(tokens * n * 4, ENCODE_CHUNK_BYTES) * elem // 4 + tokens * self.k * 12, n
        chunk = self._chunk_latents(tokens)
        if chunk == n:  # the collector gets the whole batch as one dense tensor, widened to float32
            elem = 4
        return _chunk_bytes(tokens, chunk, elem, self.nnz_bound()), chunk

    def _prepare(self, x: Tensor) -> Tensor:
        """x as the encoder's matmul reads it: checked, in the encode dtype, normalised, minus b_dec if asked."""
        self._check_input(x)
        t = self._t
        x = x.to(device=self.device, dtype=self.dtype)
        if self.input_scale is not None:
            x = x * self.input_scale
        if self.input_norm == "constant_norm_rescale":
            x = x * (math.sqrt(self.d_in) / x.norm(dim=-1, keepdim=True))
        elif self.input_norm == "layer_norm":
            x = x - x.mean(dim=-1, keepdim=True)
            x = x / (x.std(dim=-1, keepdim=True) + 1e-5)  # SAELens: unbiased std, eps added to std
        if self.subtract_b_dec:
            x = x - t["b_dec"]
        return x

    def _pre(self, x: Tensor, sl: slice) -> Tensor:
        t = self._t
        b = t["b_enc"]
        pre = F.linear(x, t["W_enc"][sl], b[sl] if b is not None else None)
        return pre * t["dec_norm"][sl] if t["dec_norm"] is not None else pre

    def _topk(self, x: Tensor) -> tuple[Tensor, Tensor]:
        # topk(relu(pre)) == relu(topk(pre)) as dense codes: where fewer than k are positive, both write zeros.
        # Skipping the full-width relu saves a pass over [tokens, n_latents] (~3% of a 16k SAE's extraction).
        pre = self._pre(x, slice(None))
        if self.activation == "abstopk":  # the k largest |pre|, signs kept
            idx = pre.abs().topk(self.k, dim=-1, sorted=False).indices
            return pre.gather(-1, idx).float(), idx
        vals, idx = pre.topk(self.k, dim=-1, sorted=False)
        return F.relu(vals).float(), idx

    def _activate(self, x: Tensor, sl: slice) -> Tensor:
        """Codes of the latents in `sl` under a rule with no fixed count, in the encode dtype (in place on the
        pre-activations: one buffer of tokens × latents, not three)."""
        t = self._t
        if self.activation == "gated":
            # x @ (W e^r) == (x @ W) * e^r column-wise: one matmul serves both paths.
            proj = F.linear(x, t["W_enc"][sl])
            gate = (proj + t["b_gate"][sl]) > 0
            return gate * F.relu(proj * t["mag_scale"][sl] + t["b_mag"][sl])
        pre = self._pre(x, sl)
        act = self.activation
        if act == "relu":
            return pre.relu_()
        if act == "tanh_relu":
            return pre.relu_().tanh_()
        if act == "jumprelu":
            return pre.masked_fill_(~(pre > t["threshold"][sl]), 0).relu_()
        # groupmax: k contiguous groups of n/k latents, keep each group's max at its position
        groups = pre.relu_().unflatten(-1, (-1, self.n_latents // self.k))
        vals, idx = groups.max(dim=-1, keepdim=True)
        return torch.zeros_like(groups).scatter_(-1, idx, vals).flatten(-2)


def _scatter_topk(v: Tensor, k: int) -> Tensor:
    vals, idx = v.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(v).scatter_(-1, idx, vals)


class NeuronDictionary(Dictionary):
    """Raw neurons as a dictionary: encode(x) = x (negatives kept), or top-k by value per token."""

    def __init__(self, d_in: int, k: int | None = None, hookpoint: str | None = None):
        self.format = "neurons" if k is None else "topk-neurons"
        self.source = "neurons" if k is None else f"topk-neurons:{k}"
        self.id = f"{self.source}:d_in={d_in}" + (f":{hookpoint}" if hookpoint else "")
        self.hookpoint, self.transcoder = hookpoint, False
        self.d_in = self.d_out = self.n_latents = d_in
        self.k = k
        self.signed = k is None  # raw neurons go both ways; top-k by value keeps the positive ones
        self.cfg = {"d_in": d_in, "k": k}
        self._device, self._dtype = torch.device("cpu"), torch.float32

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "NeuronDictionary":
        self._device = torch.device(device) if device is not None else self._device
        self._dtype = dtype or self._dtype
        return self

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        self._check_input(x)
        x = x.to(device=self._device, dtype=self._dtype)
        if self.k is not None:
            x = _scatter_topk(x, self.k)
        return x.float()

    def nnz_bound(self) -> int:
        return self.k or self.n_latents  # raw neurons fire at about half of them: count all

    def decoder_directions(self) -> Tensor:
        # Neuron i "writes" along the i-th basis vector of its own activation space.
        return torch.eye(self.d_in, device=self._device, dtype=self._dtype)

    def decode(self, codes: Tensor) -> Tensor:
        return codes.to(device=self._device, dtype=self._dtype)


class Poles(Dictionary):
    """A signed dictionary as 2 × n unsigned units, what the collector, the store and everything downstream see:
    unit i < n is latent i's positive pole (its code where > 0), unit n + i its negative pole (-code where < 0),
    with decoder direction -d_i, so steering a negative pole by +a writes -a d_i. decode(units) equals the signed
    dictionary's decode of (units[:n] - units[n:])."""

    def __init__(self, base: Dictionary):
        if not base.signed:
            raise ValueError(f"{base.id}: Poles wraps signed dictionaries only")
        self.base, self.n_base = base, base.n_latents
        for name in ("format", "source", "id", "hookpoint", "transcoder", "d_in", "d_out", "input_hookpoint", "cfg"):
            setattr(self, name, getattr(base, name))
        self.n_latents = 2 * base.n_latents
        self.k = getattr(base, "k", None)

    @property
    def dtype(self) -> torch.dtype:
        return self.base.dtype

    @property
    def device(self) -> torch.device:
        return self.base.device

    def to(self, device=None, dtype=None) -> "Poles":
        self.base.to(device, dtype)
        return self

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        c = self.base.encode(x)
        return torch.cat([c.clamp(min=0), (-c).clamp(min=0)], dim=-1)

    @torch.no_grad()
    def encode_topk(self, x: Tensor) -> tuple[Tensor, Tensor] | None:
        got = self.base.encode_topk(x)
        if got is None:
            return None
        vals, idx = got
        return vals.abs(), torch.where(vals < 0, idx + self.n_base, idx)

    def nnz_bound(self) -> int:
        return self.base.nnz_bound()

    def encode_bytes(self, tokens: int) -> tuple[int, int]:
        got, chunk = self.base.encode_bytes(tokens)
        return 2 * got, 2 * chunk

    def unloaded_bytes(self) -> int:
        return self.base.unloaded_bytes()

    def decoder_directions(self) -> Tensor:
        d = self.base.decoder_directions()
        return torch.cat([d, -d])

    def decode(self, codes: Tensor) -> Tensor:
        return self.base.decode(codes[..., :self.n_base] - codes[..., self.n_base:])

    def reconstruct(self, x: Tensor) -> Tensor:
        return self.base.reconstruct(x)


def as_units(d: Dictionary) -> Dictionary:
    """What an extraction collects: a signed dictionary's poles, any other dictionary itself."""
    return Poles(d) if d.signed else d



