"""The one Dictionary interface used by the collector: encode activations into dense latent codes.

Every checkpoint format is loaded into one of two classes:
  * LinearDictionary: an affine encoder + activation (all SAE / transcoder formats);
  * NeuronDictionary: the identity (raw neurons) or its top-k sparsification.
"""

from __future__ import annotations

import math
from typing import Any

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
ACTIVATIONS = ("relu", "tanh_relu", "relu_topk", "topk_relu", "groupmax", "jumprelu", "gated")

# Bytes of pre-activations one top-k encode step may hold: tokens × n_latents never exists at once (a batch of 2048
# tokens through a 1M-latent encoder would be 8 GiB in fp32). 16k latents fit a whole batch, as before.
ENCODE_CHUNK_BYTES = 256 << 20


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

    def encode(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def encode_topk(self, x: Tensor) -> tuple[Tensor, Tensor] | None:
        """For top-k encoders: (values, indices) [..., k], the same codes as `encode` without the dense
        [..., n_latents] tensor (the collector reads k entries per token instead of scanning all n). None for
        encoders with no fixed number of nonzeros per token."""
        return None

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
        self._t: dict[str, Tensor | None] = dict(
            W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec, threshold=threshold, b_gate=b_gate, b_mag=b_mag,
            r_mag=r_mag,
        )
        self._derive()

    def _derive(self) -> None:
        t = self._t
        # Precomputed once per device/dtype: the decoder row norms and the gated magnitude scale.
        t["dec_norm"] = t["W_dec"].norm(dim=-1) if self.rescale_by_decoder_norm else None
        t["mag_scale"] = t["r_mag"].exp() if t["r_mag"] is not None else None

    @property
    def dtype(self) -> torch.dtype:
        return self._t["W_enc"].dtype

    @property
    def device(self) -> torch.device:
        return self._t["W_enc"].device

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "LinearDictionary":
        for name, v in self._t.items():
            if v is not None and name not in ("dec_norm", "mag_scale"):
                self._t[name] = v.to(device=device or v.device, dtype=dtype or v.dtype)
        self._derive()
        return self

    def decoder_directions(self) -> Tensor:
        return self._t["W_dec"]

    def encoder_weight(self) -> Tensor:
        """Encoder rows [n_latents, d_in] (useful for diagnostics)."""
        return self._t["W_enc"]

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        if self.activation in ("relu_topk", "topk_relu"):
            vals, idx = self.encode_topk(x)
            return torch.zeros((*x.shape[:-1], self.n_latents), device=vals.device).scatter_(-1, idx, vals)
        return self._encode(x)

    @torch.no_grad()
    def encode_topk(self, x: Tensor) -> tuple[Tensor, Tensor] | None:
        if self.activation not in ("relu_topk", "topk_relu"):
            return None
        rows = max(1, ENCODE_CHUNK_BYTES // (4 * self.n_latents))
        flat = x.reshape(-1, x.shape[-1])
        if flat.shape[0] <= rows:
            return self._encode(x)
        parts = [self._encode(chunk) for chunk in flat.split(rows)]  # rows are independent: the same codes
        shape = (*x.shape[:-1], self.k)
        return torch.cat([p[0] for p in parts]).view(shape), torch.cat([p[1] for p in parts]).view(shape)

    def _encode(self, x: Tensor):
        """Dense codes; for the top-k rules (values, indices) instead."""
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

        if self.activation == "gated":
            # x @ (W e^r) == (x @ W) * e^r column-wise: one matmul serves both paths.
            proj = F.linear(x, t["W_enc"])
            gate = (proj + t["b_gate"]) > 0
            return (gate * F.relu(proj * t["mag_scale"] + t["b_mag"])).float()

        pre = F.linear(x, t["W_enc"], t["b_enc"])
        if t["dec_norm"] is not None:
            pre = pre * t["dec_norm"]
        act = self.activation
        if act == "relu":
            out = F.relu(pre)
        elif act == "tanh_relu":
            out = torch.tanh(F.relu(pre))
        elif act == "jumprelu":
            out = F.relu(pre) * (pre > t["threshold"])
        elif act in ("relu_topk", "topk_relu"):
            # topk(relu(pre)) == relu(topk(pre)) as dense codes: where fewer than k are positive, both write zeros.
            # Skipping the full-width relu saves a pass over [tokens, n_latents] (~3% of a 16k SAE's extraction).
            vals, idx = pre.topk(self.k, dim=-1, sorted=False)
            return F.relu(vals).float(), idx
        else:  # groupmax: k contiguous groups of n/k latents, keep each group's max at its position
            groups = F.relu(pre).unflatten(-1, (self.k, -1))
            vals, idx = groups.max(dim=-1, keepdim=True)
            out = torch.zeros_like(groups).scatter_(-1, idx, vals).flatten(-2)
        return out.float()


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

    def decoder_directions(self) -> Tensor:
        # Neuron i "writes" along the i-th basis vector of its own activation space.
        return torch.eye(self.d_in, device=self._device, dtype=self._dtype)
