"""Steering: edit the activations at a hookpoint while the model runs.

`intervene(model, hookpoint, edits, dictionary)` is the one intervention: a list of per-latent `Edit`s on a
dictionary's latents, each `add` (x + value * d_j), `clamp` (latent j's code set to the value:
x + (value - code_j(x)) * d_j, code_j by the dictionary's own encode) or `ablate` (x - (x . u) u, u the unit
direction); d_j is what one unit of latent j's code writes. `steer(model, hookpoint, direction, alpha)` is `add`
along one bare direction. The hookpoint is resolved by `autointerp.subject.resolve_hookpoint` (aliases
`resid_post.N`, `mlp_out.N`, `attn_out.N`, module paths, `:input`); outputs that are tuples (decoder layers,
attention) get the first element edited, inputs (`resid_pre.N`, `mlp_in.N`) are edited by a pre-hook.
`corpus_loss` is the next-token loss of a corpus clean vs under interventions.
"""

from __future__ import annotations

import math
import threading
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, ContextManager

import torch
import torch.nn.functional as F
from torch import nn

from .corpus import CorpusSpec, iter_windows
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


MODES = ("add", "clamp", "ablate")


@dataclass(frozen=True)
class Edit:
    """One latent's edit. `value`: add: the code added (value * d_j is written); clamp: the code it is set to;
    ablate: unused."""

    latent: int
    mode: str = "add"
    value: float = 0.0


def check_edits(edits: list[Edit], n_latents: int, label: str = "latent") -> list[Edit]:
    """The edits, checked: a known mode, a latent in range, each latent once, a finite value (ConfigError naming
    the bad one as `label` N, e.g. "--latent 7")."""
    seen: set[int] = set()
    for e in edits:
        if e.mode not in MODES:
            raise ConfigError(f"{label} {e.latent}: mode {e.mode!r}, expected one of {', '.join(MODES)}")
        if not 0 <= e.latent < n_latents:
            raise ConfigError(f"{label} {e.latent} out of range (the dictionary has {n_latents} latents)")
        if e.latent in seen:
            raise ConfigError(f"{label} {e.latent} edited twice (one edit per latent)")
        if not math.isfinite(e.value):
            raise ConfigError(f"{label} {e.latent}: value {e.value} is not a finite number")
        seen.add(e.latent)
    return list(edits)


def _n_latents(dictionary) -> int:
    return int(dictionary.shape[0]) if isinstance(dictionary, torch.Tensor) else int(dictionary.n_latents)


def write_directions(dictionary, latents: list[int]) -> torch.Tensor:
    """[len(latents), d] what one unit of each latent's code writes: rows of a bare direction matrix, or
    decode(e_j) - decode(0) of a Dictionary (its decoder row, divided by its norm where codes were scaled by it;
    a signed dictionary's "-" pole writes -d_i). Dictionaries that normalise their input are edited in the space
    their decode writes."""
    if isinstance(dictionary, torch.Tensor):
        return dictionary[list(latents)].detach().float()
    with torch.no_grad():
        one_hot = torch.zeros(len(latents) + 1, dictionary.n_latents)
        one_hot[torch.arange(len(latents)), torch.as_tensor(list(latents), dtype=torch.long)] = 1.0
        out = dictionary.decode(one_hot).float()
    return out[:-1] - out[-1]


def latent_codes(dictionary, x: torch.Tensor, latents: list[int]) -> torch.Tensor:
    """[..., len(latents)] the dictionary's codes of those latents for activations x, float32 on x's device (a
    top-k encoder's from its k entries: no dense [..., n_latents] per forward pass)."""
    idx = torch.as_tensor(list(latents), dtype=torch.long)
    got = dictionary.encode_topk(x)
    if got is not None:
        vals, top = got
        hit = top.unsqueeze(-1) == idx.to(top.device)  # [..., k, len(latents)]
        codes = (vals.float().unsqueeze(-1) * hit).sum(-2)
    else:
        codes = dictionary.encode(x)
        codes = (codes.to_dense() if codes.is_sparse else codes)[..., idx.to(codes.device)]
    return codes.to(device=x.device, dtype=torch.float32)


def _exact(device: torch.device) -> torch.dtype:
    """Edits other than adds run in float64 (MPS has none), so an ablated component is gone to the rounding of the
    activations' own dtype."""
    return torch.float32 if device.type == "mps" else torch.float64


def _editor(edits: list[Edit], dictionary, device: torch.device):
    """fn(x, x_read) -> x edited: ablations project x off the span of their unit directions, then add and clamp
    write along their latents' directions, clamp's codes read (by the dictionary) from x_read, the unedited
    activations where the dictionary reads."""
    writes = write_directions(dictionary, [e.latent for e in edits]).to(device)
    adds, clamps, ablates = ([i for i, e in enumerate(edits) if e.mode == m] for m in MODES)
    shift = sum((edits[i].value * writes[i] for i in adds), torch.zeros(writes.shape[1], device=device))
    basis = None
    if ablates:
        zero = [edits[i].latent for i in ablates if not writes[i].any()]
        if zero:
            raise ConfigError(f"ablate: latent {zero[0]} has a zero decoder direction")
        # an orthonormal basis of their span (SVD, not a projection per direction: those need not be orthogonal,
        # and both poles of a signed latent are one direction)
        u, sv, _ = torch.linalg.svd(F.normalize(writes[ablates].double().cpu(), dim=-1).T, full_matrices=False)
        basis = u[:, sv > sv[0] * 1e-6].to(device=device, dtype=_exact(device))
    clamp_latents = [edits[i].latent for i in clamps]
    targets = torch.tensor([edits[i].value for i in clamps], device=device)

    def change(x: torch.Tensor, x_read: torch.Tensor | None) -> torch.Tensor:
        if x.shape[-1] != writes.shape[1]:
            raise ConfigError(f"steering: direction has width {writes.shape[1]} but the hookpoint's activations "
                              f"have width {x.shape[-1]} (wrong hookpoint for this dictionary?)")
        if basis is None and not clamps:
            return x + shift.to(x.dtype)  # add only: the same arithmetic as a plain shift
        y = x.to(_exact(x.device))
        if basis is not None:
            y = y - (y @ basis) @ basis.T
        y = y + shift.to(y)
        if clamps:
            codes = latent_codes(dictionary, x if x_read is None else x_read, clamp_latents)
            y = y + (targets - codes).to(y) @ writes[clamps].to(y)
        return y.to(x.dtype)

    return change


@contextmanager
def intervene(model: nn.Module, hookpoint: str | Hookpoint, edits: list[Edit], dictionary, *,
              read_hookpoint: str | Hookpoint | None = None):
    """Within the block, every forward pass applies `edits` at every position of the hookpoint.

    `dictionary`: a Dictionary (clamp needs its encode) or a [n, d] tensor of bare directions. `read_hookpoint`:
    where the dictionary reads when that is not where it writes (a transcoder reads its MLP's input and writes its
    output): clamp's codes are encoded there, in the same forward pass. Several add edits write the sum of their
    single edits. No edits left (adds of 0 dropped) install no hook, so a "clean" run is bit-identical to an
    unhooked one."""
    hp = hookpoint if isinstance(hookpoint, Hookpoint) else resolve_hookpoint(model, hookpoint)
    edits = check_edits(list(edits), _n_latents(dictionary)) if edits else []
    edits = [e for e in edits if not (e.mode == "add" and e.value == 0)]
    if not edits:
        yield hp
        return
    if any(e.mode == "clamp" for e in edits) and not hasattr(dictionary, "encode"):
        raise ConfigError("clamp needs the dictionary's encoder (bare directions have none)")
    change = _editor(edits, dictionary, next(model.parameters()).device)
    read = None
    if read_hookpoint is not None and any(e.mode == "clamp" for e in edits):
        read = read_hookpoint if isinstance(read_hookpoint, Hookpoint) else resolve_hookpoint(model, read_hookpoint)
        if (read.module_path, read.mode) == (hp.module_path, hp.mode):
            read = None
    if read is None:
        with _rewrite(hp, lambda value: _apply(value, lambda x: change(x, None))):
            yield hp
        return
    seen: dict[str, torch.Tensor] = {}
    with _rewrite(read, lambda value: _keep(value, seen)), \
            _rewrite(hp, lambda value: _apply(value, lambda x: change(x, seen["x"]))):
        yield hp


def _keep(value, seen: dict):
    seen["x"] = value if isinstance(value, torch.Tensor) else value[0]
    return value


def _apply(value, fn):
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return type(value)((fn(value[0]), *value[1:]))
    raise TypeError(f"hookpoint gave {type(value).__name__}, expected a tensor or a tuple starting with one")


@contextmanager
def steer(model: nn.Module, hookpoint: str | Hookpoint, direction: torch.Tensor, alpha: float = 1.0):
    """Within the block, every forward pass adds alpha * direction ([d]) at every position of the hookpoint
    (`intervene` with one add edit along a bare direction). alpha == 0 installs no hook at all."""
    with intervene(model, hookpoint, [Edit(0, "add", float(alpha))], direction.detach().reshape(1, -1)) as hp:
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

    return _apply(value, one)


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


@dataclass(frozen=True)
class CorpusLoss:
    clean: float  # mean next-token cross-entropy, nats per predicted token
    intervened: dict  # {key of `interventions`: the same under it}
    n_tokens: int  # predicted tokens (ctx_len - 1 per window)


def _token_nll(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """[B, T-1] -log p(token t+1 | tokens ..t)."""
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
    # classes on the last, contiguous dim: a softmax over a strided dim sums 49k terms less exactly (~1e-4 nats)
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    return nll.view(ids.shape[0], -1)


@torch.no_grad()
def corpus_loss(subject, corpus: CorpusSpec, interventions: dict[Any, Callable[[], ContextManager]], *,
                batch_size: int = 8, progress: bool = False) -> CorpusLoss:
    """The mean next-token loss over the corpus's windows (`iter_windows`: every next token of every window), clean
    and within each of `interventions` (e.g. {"ablate 5": lambda: intervene(...)}): each batch runs clean, then once
    per intervention, under the model's lock; sums in float64."""
    from tqdm import tqdm

    clean, sums, n = 0.0, dict.fromkeys(interventions, 0.0), 0
    with tqdm(total=corpus.n_windows, unit="window", disable=not progress, desc="corpus loss") as bar:
        for batch in iter_windows(corpus, subject.tokenizer, batch_size):
            ids = torch.as_tensor(batch, dtype=torch.long, device=subject.device)
            with model_lock(subject.model):
                nll = _token_nll(subject.model, ids)
                clean += float(nll.double().sum())
                n += nll.numel()
                for key, intervention in interventions.items():
                    with intervention():
                        sums[key] += float(_token_nll(subject.model, ids).double().sum())
            bar.update(len(batch))
    return CorpusLoss(clean / n, {k: v / n for k, v in sums.items()}, n)
