"""Steering: add `alpha * direction` to the activations at a hookpoint while the model runs.

`steer(model, hookpoint, direction, alpha)` is a context manager. The hookpoint is resolved by
`autointerp.subject.resolve_hookpoint` (aliases `resid_post.N`, `mlp_out.N`, `attn_out.N`, module paths, `:input`);
outputs that are tuples (decoder layers, attention) get the first element shifted, inputs (`resid_pre.N`,
`mlp_in.N`) are shifted by a pre-hook.
"""

from __future__ import annotations

import threading
import weakref
from contextlib import contextmanager

import torch
from torch import nn

from .errors import ConfigError
from .subject import Hookpoint, resolve_hookpoint


_MODEL_LOCKS: "weakref.WeakKeyDictionary[nn.Module, threading.RLock]" = weakref.WeakKeyDictionary()
_MODEL_LOCKS_GUARD = threading.Lock()


def model_lock(model: nn.Module) -> threading.RLock:
    """The one lock of a model shared by several scorers (intervention steers it, surprisal reads with it): hooks
    are global to the model, so a forward pass run while another thread steers would be steered too, and a fast
    tokenizer used from two threads at once fails ("Already borrowed"). Hold it around every use of the model."""
    with _MODEL_LOCKS_GUARD:
        lock = _MODEL_LOCKS.get(model)
        if lock is None:
            lock = _MODEL_LOCKS[model] = threading.RLock()
        return lock


def _add(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    if x.shape[-1] != delta.shape[0]:
        raise ConfigError(f"steering: direction has width {delta.shape[0]} but the hookpoint's activations have "
                          f"width {x.shape[-1]} (wrong hookpoint for this dictionary?)")
    return x + delta.to(x.dtype)


def _shift(value, delta: torch.Tensor):
    if isinstance(value, torch.Tensor):
        return _add(value, delta)
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return type(value)((_add(value[0], delta), *value[1:]))
    raise TypeError(f"steering: hookpoint gave {type(value).__name__}, expected a tensor or a tuple starting with one")


@contextmanager
def steer(model: nn.Module, hookpoint: str | Hookpoint, direction: torch.Tensor, alpha: float = 1.0):
    """Within the block, every forward pass adds alpha * direction ([d]) at every position of the hookpoint.

    alpha == 0 installs no hook at all, so the "clean" run is bit-identical to an unhooked one.
    """
    hp = hookpoint if isinstance(hookpoint, Hookpoint) else resolve_hookpoint(model, hookpoint)
    if alpha == 0:
        yield hp
        return
    p = next(model.parameters())
    delta = (float(alpha) * direction.detach().to(device=p.device, dtype=torch.float32)).reshape(-1)
    with _rewrite(hp, lambda value: _shift(value, delta)):
        yield hp


@contextmanager
def _rewrite(hp: Hookpoint, change):
    """Every forward pass in the block passes the hookpoint's value through `change`: an input by a forward
    pre-hook (positional or keyword), an output by a forward hook."""
    if hp.mode == "input":

        def pre_hook(mod, args, kwargs):
            if args:
                return (change(args[0]), *args[1:]), kwargs
            key = next(iter(kwargs))  # e.g. hidden_states=... passed by keyword
            return args, {**kwargs, key: change(kwargs[key])}

        handle = hp.module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    else:
        handle = hp.module.register_forward_hook(lambda mod, args, output: change(output))
    try:
        yield
    finally:
        handle.remove()


def _swap(value, fn):
    def one(x: torch.Tensor) -> torch.Tensor:
        y = fn(x)
        if y.shape != x.shape:
            raise ConfigError(f"replace: the replacement has shape {tuple(y.shape)}, the hookpoint's activations "
                              f"{tuple(x.shape)}")
        return y

    if isinstance(value, torch.Tensor):
        return one(value)
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return type(value)((one(value[0]), *value[1:]))
    raise TypeError(f"replace: hookpoint gave {type(value).__name__}, expected a tensor or a tuple starting with one")


@contextmanager
def replace(model: nn.Module, hookpoint: str | Hookpoint, fn):
    """Within the block, every forward pass replaces the activations x at the hookpoint by fn(x) (same shape):
    splicing a dictionary's reconstruction in (autointerp.quality), or reading x by returning it unchanged.
    Installed as `steer` installs its shift: inputs by a forward pre-hook, outputs by a forward hook."""
    hp = hookpoint if isinstance(hookpoint, Hookpoint) else resolve_hookpoint(model, hookpoint)
    with _rewrite(hp, lambda value: _swap(value, fn)):
        yield hp


@torch.no_grad()
def activation_norm(model: nn.Module, tokenizer, hookpoint: str | Hookpoint, texts: list[str]) -> float:
    """Median L2 norm of the activations at the hookpoint over the tokens of `texts`.

    The first position is left out: it is an attention sink whose norm is often many times the others'.
    """
    hp = hookpoint if isinstance(hookpoint, Hookpoint) else resolve_hookpoint(model, hookpoint)
    grabbed: list[torch.Tensor] = []

    def grab(value):
        grabbed.append((value if isinstance(value, torch.Tensor) else value[0]).detach().float())

    if hp.mode == "input":
        handle = hp.module.register_forward_pre_hook(
            lambda mod, args, kwargs: grab(args[0] if args else next(iter(kwargs.values()))), with_kwargs=True
        )
    else:
        handle = hp.module.register_forward_hook(lambda mod, args, output: grab(output))
    device = next(model.parameters()).device
    norms = []
    try:
        for t in texts:
            ids = tokenizer(t, return_tensors="pt").input_ids.to(device)
            grabbed.clear()
            model(input_ids=ids, use_cache=False)
            norms.append(grabbed[0][0, 1:].norm(dim=-1))
    finally:
        handle.remove()
    allnorms = torch.cat(norms)
    if allnorms.numel() == 0:
        raise ValueError("activation_norm: texts too short (need at least two tokens each)")
    return float(allnorms.median())
