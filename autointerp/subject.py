"""The subject model: a causal LM whose activations we read at one or more hookpoints.

Hookpoints are module paths (`model.layers.12`, `model.layers.12.mlp`, `model.layers.12.mlp.act_fn`), optionally
with `:input` / `:output`, or friendly aliases:

    resid_post.N  output of decoder layer N      resid_pre.N  input of decoder layer N
    mlp_out.N     output of layer N's MLP        mlp_in.N     input of layer N's MLP (what transcoders read)
    attn_out.N    output of layer N's attention  mlp_neurons.N  the MLP hidden units (input of its down projection)
    resid_mid.N   the residual stream between layer N's attention and MLP blocks

`mlp_out` / `attn_out` are what the block adds to the residual stream (TransformerLens' hook_mlp_out /
hook_attn_out): in models with norms after each block (Gemma 2/3, OLMo 2: `post_feedforward_layernorm`), the
output of that norm, not of the bare MLP / attention module.

A forward pass runs only until every requested hookpoint has been captured: later layers and the LM head are
never computed.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import ConfigError
from .hf_loading import DEFAULT_MODEL, load_causal_lm

# Where decoder layers live, and the names of their attention / MLP / MLP-down submodules, per architecture family.
_LAYER_LISTS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers", "transformer.layers")
_ATTN = ("self_attn", "attn", "attention", "self_attention")
_MLP = ("mlp", "feed_forward", "ffn", "block_sparse_moe")  # Mixtral names its MoE block block_sparse_moe
_DOWN = ("down_proj", "c_proj", "dense_4h_to_h", "fc2", "w2")
_OUT_PROJ = ("o_proj", "c_proj", "dense", "out_proj")
_ALIAS = re.compile(r"^(resid_post|resid_pre|resid_mid|mlp_out|mlp_in|attn_out|attn_z|mlp_neurons)\.(\d+)$")
# Sandwich-norm layers (Gemma 2/3, OLMo 2) normalise each block's output before adding it to the residual stream.
_POST_MLP_NORM = "post_feedforward_layernorm"
_POST_ATTN_NORM = "post_attention_layernorm"
# The norm in front of the MLP in pre-norm layers (Llama's is confusingly named post_attention_layernorm)
_PRE_MLP_NORM = ("ln_2", "post_attention_layernorm", "ffn_norm")


@dataclass(frozen=True)
class Hookpoint:
    name: str  # as the user wrote it
    module_path: str  # resolved module path
    mode: str  # "output" | "input"
    module: nn.Module


class _StopForward(Exception):
    """Raised by the last capture hook so the model computes nothing past the deepest hookpoint."""


def _get(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _layer_list_path(model: nn.Module) -> str:
    for p in _LAYER_LISTS:
        if isinstance(_get(model, p), nn.ModuleList):
            return p
    raise ConfigError(f"hookpoint: cannot find the decoder layers of {type(model).__name__} (looked for {_LAYER_LISTS})")


def _child(model: nn.Module, base: str, names: tuple[str, ...], what: str) -> str:
    for n in names:
        if _get(model, f"{base}.{n}") is not None:
            return f"{base}.{n}"
    raise ConfigError(f"hookpoint: {base} has no {what} submodule (looked for {', '.join(names)})")


def _sandwich(model: nn.Module, layer: str) -> bool:
    return _get(model, f"{layer}.{_POST_MLP_NORM}") is not None


def mlp_read_and_write(model: nn.Module, hook: Hookpoint) -> tuple[str, str]:
    """For a transcoder at `hook` (an MLP, or what mlp_out resolves to): (where it reads: the MLP's input, where it
    writes: what the MLP adds to the residual stream, after a sandwich norm if the layer has one)."""
    path = hook.module_path
    if path.endswith(f".{_POST_MLP_NORM}"):  # mlp_out of a sandwich-norm layer
        layer = path.rsplit(".", 1)[0]
        return f"{_child(model, layer, _MLP, 'MLP')}:input", f"{path}:output"
    layer, last = path.rsplit(".", 1) if "." in path else ("", path)
    if last in _MLP and layer and _sandwich(model, layer):
        return f"{path}:input", f"{layer}.{_POST_MLP_NORM}:output"
    return f"{path}:input", f"{path}:output"


def _candidates(model: nn.Module) -> list[str]:
    names = [n for n, _ in model.named_modules() if n]
    try:
        n_layers = len(model.get_submodule(_layer_list_path(model)))
        names += [f"{a}.{i}" for a in ("resid_post", "resid_pre", "resid_mid", "mlp_out", "mlp_in", "attn_out",
                                        "mlp_neurons")
                  for i in range(n_layers)]
    except ConfigError:
        pass
    return names


def resolve_hookpoint(model: nn.Module, name: str) -> Hookpoint:
    """Map an alias or module path (optionally `:input`/`:output`) to the module and what to capture from it."""
    raw = name.strip()
    mode = "output"
    path = raw
    if raw.endswith((":input", ":output")):
        path, mode = raw.rsplit(":", 1)
    m = _ALIAS.match(path)
    if m:
        kind, idx = m.group(1), int(m.group(2))
        layers = _layer_list_path(model)
        n_layers = len(model.get_submodule(layers))
        if idx >= n_layers:
            raise ConfigError(f"hookpoint {raw!r}: layer {idx} out of range (the model has {n_layers} layers: 0..{n_layers - 1})")
        layer = f"{layers}.{idx}"
        if kind == "resid_post":
            path = layer
        elif kind == "resid_pre":
            path, mode = layer, "input"
        elif kind == "attn_out":
            path = f"{layer}.{_POST_ATTN_NORM}" if _sandwich(model, layer) else _child(model, layer, _ATTN, "attention")
        elif kind == "resid_mid":  # the input of the norm in front of the MLP (OLMo 2 has none: the MLP's input)
            if _sandwich(model, layer):
                pre = f"{layer}.pre_feedforward_layernorm"
                path = pre if _get(model, pre) is not None else _child(model, layer, _MLP, "MLP")
            else:
                path = _child(model, layer, _PRE_MLP_NORM, "norm in front of the MLP")
            mode = "input"
        elif kind == "attn_z":  # the heads' concatenated outputs (Gemma Scope 'att' SAEs): input of the out proj
            path, mode = _child(model, _child(model, layer, _ATTN, "attention"), _OUT_PROJ, "attention output projection"), "input"
        elif kind == "mlp_out":
            path = f"{layer}.{_POST_MLP_NORM}" if _sandwich(model, layer) else _child(model, layer, _MLP, "MLP")
        elif kind == "mlp_in":
            path, mode = _child(model, layer, _MLP, "MLP"), "input"
        else:  # mlp_neurons: the hidden units = input of the MLP's down projection
            mlp = _child(model, layer, _MLP, "MLP")
            if _get(model, f"{mlp}.experts") is not None:  # each expert sees only its routed tokens
                raise ConfigError(f"hookpoint {raw!r}: layer {idx}'s MLP ({mlp}) is a mixture of experts, with no "
                                  f"single down projection to read neurons from; use mlp_out.{idx} (what the block "
                                  f"writes) or mlp_in.{idx} (what it reads) instead")
            path, mode = _child(model, mlp, _DOWN, "down projection"), "input"
    module = _get(model, path) if path else None
    if module is None:
        close = difflib.get_close_matches(path, _candidates(model), n=5, cutoff=0.6)
        hint = f"; close matches: {', '.join(close)}" if close else ""
        raise ConfigError(f"hookpoint {raw!r}: no such module in {type(model).__name__}{hint}")
    return Hookpoint(raw, path, mode, module)


def _first_tensor(x):
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)) and x and isinstance(x[0], torch.Tensor):
        return x[0]
    raise TypeError(f"hook got {type(x).__name__}, expected a tensor or a tuple starting with one")


class SubjectModel:
    """A causal LM plus hookpoint capture. `capture()` returns {hookpoint name: activations [B, T, d]}."""

    def __init__(self, model: nn.Module, tokenizer, spec: str = ""):
        self.model = model
        self.tokenizer = tokenizer
        self.spec = spec
        self._widths: dict[str, int] = {}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def max_context(self) -> int | None:
        cfg = self.model.config
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            v = getattr(cfg, key, None)
            if isinstance(v, int) and v > 0:
                return v
        return None

    @property
    def name(self) -> str:
        return self.spec or getattr(self.model.config, "_name_or_path", type(self.model).__name__)

    def special_token_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """True at BOS/EOS/pad/other special tokens: their activations (attention-sink outliers with norms 100x the
        text's) say nothing about the text, so the collector and the trainer ignore those positions."""
        if not hasattr(self, "_special"):
            ids = sorted({i for i in (self.tokenizer.all_special_ids or []) if i is not None})
            self._special = torch.tensor(ids, dtype=torch.long)
        return torch.isin(input_ids, self._special.to(input_ids.device))

    @staticmethod
    def outlier_mask(x: torch.Tensor, max_norm_ratio: float) -> torch.Tensor:
        """True where a token's activation norm exceeds `max_norm_ratio` × the batch median: the "massive
        activations" some tokens get (SmolLM2 layer 15: 25,000 vs a median of 170). 0 disables."""
        if not max_norm_ratio:
            return torch.zeros(x.shape[:-1], dtype=torch.bool, device=x.device)
        norms = x.float().norm(dim=-1)
        return norms > max_norm_ratio * norms.median()

    def hookpoint(self, name: str) -> Hookpoint:
        return resolve_hookpoint(self.model, name)

    @torch.no_grad()
    def capture(self, input_ids: torch.Tensor, hookpoints: list[str] | list[Hookpoint],
                attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        hps = [h if isinstance(h, Hookpoint) else self.hookpoint(h) for h in hookpoints]
        out: dict[str, torch.Tensor] = {}
        wanted = {h.name for h in hps}
        handles = []

        def make_hook(h: Hookpoint):
            def grab(value):
                out[h.name] = _first_tensor(value)
                if out.keys() >= wanted:
                    raise _StopForward

            if h.mode == "input":
                return h.module.register_forward_pre_hook(lambda mod, args, kwargs: grab(args if args else tuple(kwargs.values())),
                                                          with_kwargs=True)
            return h.module.register_forward_hook(lambda mod, args, output: grab(output))

        try:
            for h in hps:
                handles.append(make_hook(h))
            try:
                self.model(input_ids=input_ids.to(self.device),
                           attention_mask=None if attention_mask is None else attention_mask.to(self.device),
                           use_cache=False)
            except _StopForward:
                pass
        finally:
            for hd in handles:
                hd.remove()
        missing = wanted - out.keys()
        if missing:
            # the module exists but the model's forward never calls it (e.g. an unused or tied submodule)
            paths = ", ".join(f"{h.name} ({h.module_path}:{h.mode})" for h in hps if h.name in missing)
            raise ConfigError(f"hookpoint(s) {paths}: the module exists in {type(self.model).__name__} but was never "
                              "called in the forward pass; pick a module on the forward path (e.g. resid_post.N)")
        return out

    def width(self, hookpoint: str) -> int:
        """The activation width at a hookpoint (measured with a one-token forward pass, then cached)."""
        if hookpoint not in self._widths:
            ids = torch.tensor([[self.tokenizer.bos_token_id or 0]], dtype=torch.long)
            self._widths[hookpoint] = int(self.capture(ids, [hookpoint])[hookpoint].shape[-1])
        return self._widths[hookpoint]

    @torch.no_grad()
    def forward_to(self, input_ids: torch.Tensor, hookpoints: list[str]) -> None:
        """The bare forward pass to the same depth (the collector benchmark's baseline)."""
        self.capture(input_ids, hookpoints)


def load_subject(spec: str = DEFAULT_MODEL, device: str | None = None, dtype: str | None = None,
                 gguf_file: str | None = None) -> SubjectModel:
    """`gguf_file`: a GGUF file name inside the folder or hub repo `spec` (a `.gguf` path as `spec` needs none)."""
    model, tok = load_causal_lm(spec, device=device, dtype=dtype, gguf_file=gguf_file)
    # recorded in run manifests and reloaded from there (intervention, surprisal), and part of a run's identity:
    # a local folder + file is itself a loadable .gguf path; a hub id + file is `hub/id::file`
    if gguf_file and Path(spec).expanduser().is_dir():
        spec = str(Path(spec).expanduser() / gguf_file)
    elif gguf_file:
        spec = f"{spec}::{gguf_file}"
    return SubjectModel(model, tok, spec)


_FOREIGN = [
    (re.compile(r"^blocks\.(\d+)\.hook_resid_post$"), "resid_post.{}"),
    (re.compile(r"^blocks\.(\d+)\.hook_resid_pre$"), "resid_pre.{}"),
    (re.compile(r"^blocks\.(\d+)\.hook_mlp_out$"), "mlp_out.{}"),
    (re.compile(r"^blocks\.(\d+)\.hook_attn_out$"), "attn_out.{}"),
    (re.compile(r"^blocks\.(\d+)\.attn\.hook_z$"), "attn_z.{}"),
    (re.compile(r"^blocks\.(\d+)\.(?:hook_resid_mid|hook_mlp_in)$"), "resid_mid.{}"),  # before ln2
    (re.compile(r"^blocks\.(\d+)\.ln2\.hook_normalized$"), "mlp_in.{}"),
    (re.compile(r"^blocks\.(\d+)\.mlp\.hook_post$"), "mlp_neurons.{}"),
    (re.compile(r"^layers\.(\d+)$"), "resid_post.{}"),
    (re.compile(r"^layers\.(\d+)\.mlp$"), "mlp_out.{}"),
    (re.compile(r"^layers\.(\d+)\.self_attn$"), "attn_out.{}"),
]


def translate_hookpoint(name: str) -> str:
    """Map names other libraries write into checkpoints (TransformerLens `blocks.N.hook_*`, sparsify `layers.N`)
    to our aliases; anything else is returned unchanged."""
    for pat, fmt in _FOREIGN:
        m = pat.match(name)
        if m:
            return fmt.format(m.group(1))
    return name
