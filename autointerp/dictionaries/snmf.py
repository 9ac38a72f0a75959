"""SNMF MLP features (Shafran, Geiger & Geva): A (d_mlp × tokens) ≈ F · Gᵀ, F mixed-sign, G ≥ 0.

There is no standard published checkpoint; autointerp's layout (written by `save_snmf`, fitted by
`autointerp.snmf_fit`) is one folder holding

    snmf.safetensors   F       [d_mlp, K] float   the features: column j is factor j's neuron combination
                       G       [tokens, K] float  optional: the fitted codes (≥ 0), one row per token, windows
                                                  row-major (token t of window w is row w·ctx + t)
                       tokens  [windows, ctx] int optional: the token ids G was fitted on (or cfg.json `tokens`)
    cfg.json           hookpoint   required, e.g. "mlp_neurons.5": the MLP's hidden units (the input of its down
                                   projection), where F is read and steered
                       model       required: the subject model spec (builtin:smollm2, a hub id, a folder)
                       tokens      [[ids of window 0], ...] when G is given and the safetensors holds no `tokens`
                       d_mlp       optional: checked against F's rows

Encoding (codes of new activations x) is non-negative least squares against F's columns, per token:
argmin_{g ≥ 0} ‖x − F g‖ — G's own definition given F. `decode(g) = g Fᵀ` (no bias); the decoder directions, what
steering adds at the hookpoint, are F's columns. Codes are never negative, so the dictionary is unsigned.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from autointerp.errors import ConfigError

from ._files import one_line, read_json
from .base import ENCODE_CHUNK_BYTES, Dictionary

CFG, WEIGHTS = "cfg.json", "snmf.safetensors"
_FLOATS = ("F64", "F32", "F16", "BF16")
_INTS = ("I64", "I32", "I16", "U16", "U32")

# NNLS settings: accelerated projected gradient to find each token's support, then an exact least-squares solve on
# it (the FISTA iterate alone converges slowly when F's columns correlate: cond(FᵀF) ~ 5e3 for SmolLM2 layer 5).
NNLS_ITERS = 200  # the most projected-gradient steps
NNLS_TOL = 1e-7  # stop early once no code moved by more than this × the largest code
NNLS_ROUNDS = 32  # active-set corrections after the gradient phase (exact once a token's support is right)
# float64 throughout the solve: with cond(FᵀF) in the thousands, float32 gives ~1e-3 relative code errors.
SOLVE_DTYPE = torch.float64


class SnmfDictionary(Dictionary):
    """F [d_mlp, K] as a dictionary: encode = per-token NNLS against F's columns, decode = codes @ Fᵀ."""

    def __init__(self, F: Tensor, *, source: str, id: str, hookpoint: str | None, cfg: dict[str, Any] | None = None):
        self.format, self.source, self.id = "snmf", source, id
        self.hookpoint, self.transcoder, self.signed = hookpoint, False, False
        self.d_in = self.d_out = int(F.shape[0])
        self.n_latents = int(F.shape[1])
        self.cfg = cfg or {}
        self._F = F
        self._derive()

    def _derive(self) -> None:
        # FᵀF and its largest eigenvalue (the gradient's Lipschitz constant) depend on F only: computed once.
        self._F64 = Fd = self._F.to(SOLVE_DTYPE)
        self._gram = Fd.T @ Fd
        self._lip = float(torch.linalg.eigvalsh(self._gram)[-1]) if self.n_latents else 1.0

    @property
    def dtype(self) -> torch.dtype:
        return self._F.dtype

    @property
    def device(self) -> torch.device:
        return self._F.device

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "SnmfDictionary":
        self._F = self._F.to(device=device or self._F.device, dtype=dtype or self._F.dtype)
        self._derive()
        return self

    def decoder_directions(self) -> Tensor:
        return self._F.T

    @torch.no_grad()
    def decode(self, codes: Tensor) -> Tensor:
        return codes.to(device=self.device, dtype=self.dtype) @ self._F.T

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        self._check_input(x)
        flat = x.reshape(-1, self.d_in).to(self.device)
        out = torch.empty(flat.shape[0], self.n_latents, dtype=torch.float32, device=self.device)
        step = self._chunk_tokens()
        for i in range(0, flat.shape[0], step):  # tokens are independent problems
            Fx = flat[i:i + step].to(SOLVE_DTYPE) @ self._F64
            out[i:i + step] = nnls_gram(self._gram, Fx, self._lip).float()
        return out.reshape(*x.shape[:-1], self.n_latents)

    def _chunk_tokens(self) -> int:
        # the active-set solve holds a [tokens, K, K] system (plus its factor) per chunk
        per_token = 3 * self.n_latents * self.n_latents * 8 + 16 * self.n_latents * 8
        return max(1, ENCODE_CHUNK_BYTES // per_token)

    def nnz_bound(self) -> int:
        return self.n_latents  # NNLS codes are not sparse by construction: count them all

    def encode_bytes(self, tokens: int) -> tuple[int, int]:
        chunk = min(tokens, self._chunk_tokens())
        solve = chunk * (3 * self.n_latents ** 2 + 16 * self.n_latents) * 8
        # the collector gets the whole batch as one dense float32 tensor, plus each nonzero's indices and value
        return solve + tokens * self.n_latents * (4 + 40), self.n_latents


def _solve_on(gram: Tensor, b: Tensor, support: Tensor, chol: Tensor | None) -> Tensor:
    """Per token, the unconstrained least squares restricted to `support` [N, K] (zero elsewhere): Q_SS z_S = b_S.
    Tokens using every feature (most of them for SNMF features) share one Cholesky factor of Q; the others are one
    batched system each, with the identity on the coordinates outside S."""
    z = torch.zeros_like(b)
    full = support.all(-1)
    if chol is not None and bool(full.any()):
        z[full] = torch.cholesky_solve(b[full].T, chol).T
        support, b, rest = support[~full], b[~full], ~full
    else:
        rest = None
    if b.shape[0]:
        s = support.to(gram.dtype)
        # a ridge of ~1e-12 relative keeps exactly dependent columns solvable without moving a well-posed solution
        ridge = 1e-12 * float(gram.diagonal().mean().clamp(min=1e-30))
        m = gram * s[:, :, None] * s[:, None, :]
        m.diagonal(dim1=-2, dim2=-1).add_(1 - s + ridge)
        part = torch.linalg.solve(m, (b * s).unsqueeze(-1)).squeeze(-1) * s
        if rest is None:
            return part
        z[rest] = part
    return z


@torch.no_grad()
def nnls_gram(gram: Tensor, b: Tensor, lipschitz: float | None = None, *, n_iter: int = NNLS_ITERS,
              tol: float = NNLS_TOL, rounds: int = NNLS_ROUNDS) -> Tensor:
    """argmin_{g ≥ 0} ½ gᵀ Q g − bᵀ g for each row of b [N, K] (Q = FᵀF, b = x F: NNLS of x against F's columns).

    FISTA with per-token adaptive restart for at most `n_iter` steps gets close and names each token's support; then
    up to `rounds` Lawson–Hanson steps, batched: solve the least squares on the support; if it leaves the feasible
    set, move toward it up to the boundary and drop what hits zero; else take it and add the coordinate that most
    violates optimality (gradient < 0 off the support), or stop, exact, when none does. Every iterate is feasible
    and no step increases the objective, so an unfinished token still holds a good feasible point."""
    n, k = b.shape
    if n == 0 or k == 0:
        return b.new_zeros(n, k)
    L = lipschitz if lipschitz is not None else float(torch.linalg.eigvalsh(gram)[-1])
    L = max(L, 1e-30)
    g = (b / gram.diagonal().clamp(min=1e-30)).clamp(min=0)  # each feature alone: a cheap, feasible start
    y, t = g.clone(), torch.ones(n, 1, dtype=b.dtype, device=b.device)
    for it in range(n_iter):
        grad = y @ gram - b
        g_new = (y - grad / L).clamp_(min=0)
        step = g_new - g
        # restart the momentum of tokens whose step goes against the gradient (O'Donoghue & Candès)
        restart = (grad * step).sum(-1, keepdim=True) > 0
        t_new = (1 + torch.sqrt(1 + 4 * t * t)) / 2
        y = g_new + torch.where(restart, 0.0, (t - 1) / t_new) * step
        t = torch.where(restart, torch.ones_like(t), t_new)
        g = g_new
        if it % 25 == 24 and float(step.abs().max()) <= tol * max(float(g.abs().max()), 1e-30):
            break

    scale = b.abs().amax(-1).clamp(min=1e-30)  # per-token gradient scale for the optimality test
    chol, info = torch.linalg.cholesky_ex(gram)
    chol = chol if int(info) == 0 else None  # dependent features: every token takes the batched path
    support = g > 0
    open_ = torch.arange(n, device=b.device)  # tokens not yet proven optimal
    for _ in range(rounds):
        if open_.numel() == 0:
            break
        S, gg, bb = support[open_], g[open_], b[open_]
        z = _solve_on(gram, bb, S, chol)
        out = S & (z <= 0)
        feasible = ~out.any(-1)
        # infeasible: the largest step from gg toward z that stays ≥ 0 (gg > 0 on S, z ≤ 0 where `out`)
        ratio = torch.where(out, gg / (gg - z).clamp(min=1e-300), torch.full_like(gg, float("inf")))
        alpha, hit = ratio.min(-1)
        moved = gg + alpha.clamp(max=1)[:, None] * (z - gg)
        moved[torch.arange(len(hit), device=b.device), hit] = 0  # the blocking coordinate leaves exactly
        moved = torch.where(S, moved.clamp(min=0), 0.0)
        new_g = torch.where(feasible[:, None], z, moved)
        grad = new_g @ gram - bb
        viol = ~S & (grad < -1e-9 * scale[open_, None]) & feasible[:, None]
        optimal = feasible & ~viol.any(-1)  # the KKT conditions: the global optimum (the problem is convex)
        add = torch.nn.functional.one_hot(torch.where(viol, grad, torch.zeros_like(grad)).argmin(-1), k).bool()
        g[open_] = new_g
        support[open_] = torch.where(feasible[:, None], S | (add & viol), new_g > 0)
        open_ = open_[~optimal]
    return g


# ---------------------------------------------------------------------------------------------------- files


def _header(path: Path) -> dict[str, dict]:
    """The safetensors header (name -> dtype, shape): shapes are checked before anything large is read."""
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size <= 100 << 20:
                raise ValueError(f"header size {size}")
            header = json.loads(f.read(size))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot read safetensors file, corrupt or truncated? ({one_line(e)})") from e
    return {k: v for k, v in header.items() if k != "__metadata__"}


def _read(path: Path, name: str, rows: slice | None = None) -> Tensor:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return f.get_tensor(name) if rows is None else f.get_slice(name)[rows]
    except Exception as e:  # safetensors raises its own error types for truncated data
        raise ConfigError(f"{path}: cannot read tensor '{name}' ({one_line(e)})") from e


class SnmfFiles:
    """An SNMF folder, checked: cfg, F's shape, and (when present) G's and the tokens' shapes. Tensors are read on
    demand (`F()`, `G(rows)`, `tokens()`): G may be far larger than F."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.cfg_path, self.path = self.folder / CFG, self.folder / WEIGHTS
        self.cfg = read_json(self.cfg_path)
        head = _header(self.path)
        for key in ("hookpoint", "model"):
            v = self.cfg.get(key)
            if not isinstance(v, str) or not v.strip():
                raise ConfigError(f"{self.cfg_path}: field '{key}' must be a non-empty string, got {v!r}")
        if "F" not in head:
            found = ", ".join(sorted(head)) or "nothing"
            raise ConfigError(f"{self.path}: missing tensor 'F' [d_mlp, K] (found: {found})")
        f = head["F"]
        if len(f["shape"]) != 2 or min(f["shape"]) < 1:
            raise ConfigError(f"{self.path}: F has shape {tuple(f['shape'])}, expected 2 dims [d_mlp, K]")
        if f["dtype"] not in _FLOATS:
            raise ConfigError(f"{self.path}: F has dtype {f['dtype']}, expected a float type")
        self.d_mlp, self.k = (int(s) for s in f["shape"])
        d_cfg = self.cfg.get("d_mlp")
        if d_cfg is not None and d_cfg != self.d_mlp:
            raise ConfigError(f"{self.path}: F has {self.d_mlp} rows but {CFG} says d_mlp={d_cfg!r}")
        self.has_codes = "G" in head
        self.n_tokens = self.n_windows = self.ctx = 0
        self._cfg_tokens: np.ndarray | None = None
        if not self.has_codes:
            return
        g = head["G"]
        if len(g["shape"]) != 2 or g["shape"][1] != self.k or g["dtype"] not in _FLOATS:
            raise ConfigError(f"{self.path}: G has shape {tuple(g['shape'])} ({g['dtype']}), expected a float "
                              f"[tokens, K={self.k}] (K from F)")
        self.n_tokens = int(g["shape"][0])
        if "tokens" in head:
            tk = head["tokens"]
            if len(tk["shape"]) != 2 or tk["dtype"] not in _INTS:
                raise ConfigError(f"{self.path}: tokens has shape {tuple(tk['shape'])} ({tk['dtype']}), expected an"
                                  " integer [windows, ctx]")
            self.n_windows, self.ctx = (int(s) for s in tk["shape"])
        elif "tokens" in self.cfg:
            self._cfg_tokens = _cfg_windows(self.cfg["tokens"], self.cfg_path)
            self.n_windows, self.ctx = self._cfg_tokens.shape
        else:
            raise ConfigError(f"{self.cfg_path}: G is given but not the tokens it was fitted on: add field 'tokens'"
                              f" [[ids], ...] or a 'tokens' tensor to {WEIGHTS}")
        if self.n_windows * self.ctx != self.n_tokens:
            raise ConfigError(f"{self.path}: G has {self.n_tokens} rows but the tokens are {self.n_windows} windows"
                              f" × {self.ctx} = {self.n_windows * self.ctx}")

    def F(self) -> Tensor:
        return _read(self.path, "F")

    def G(self, rows: slice | None = None) -> Tensor:
        return _read(self.path, "G", rows).float()

    def tokens(self) -> np.ndarray:
        if self._cfg_tokens is not None:
            return self._cfg_tokens
        return _read(self.path, "tokens").numpy().astype(np.int32)


def _cfg_windows(v: Any, path: Path) -> np.ndarray:
    bad = ConfigError(f"{path}: field 'tokens' must be a non-empty list of equal-length lists of token ids")
    if not isinstance(v, list) or not v or not all(isinstance(w, list) and w for w in v):
        raise bad
    if len({len(w) for w in v}) != 1 or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                for w in v for i in w):
        raise bad
    return np.asarray(v, dtype=np.int32)


def load_snmf(folder: Path, *, source: str, id: str, hookpoint: str | None, device: str | torch.device,
              dtype: torch.dtype) -> SnmfDictionary:
    files = SnmfFiles(folder)
    F = files.F()
    if not torch.isfinite(F).all():
        raise ConfigError(f"{files.path}: F holds NaN or infinite values")
    hp = hookpoint if hookpoint is not None else files.cfg["hookpoint"]
    cfg = {k: v for k, v in files.cfg.items() if k != "tokens"}  # the windows can be large: not kept in memory
    return SnmfDictionary(F.to(device=device, dtype=dtype), source=source, id=id, hookpoint=hp, cfg=cfg)


def save_snmf(folder: str | Path, F: Tensor, G: Tensor | None = None, tokens: Any = None, *,
              cfg: dict[str, Any]) -> Path:
    """Write an SNMF folder (layout in the module docstring): F [d_mlp, K]; G [tokens, K] ≥ 0 with `tokens`
    [windows, ctx] (token ids, stored as an int32 tensor) when given; cfg needs `hookpoint` and `model`."""
    from safetensors.torch import save_file

    folder = Path(folder)
    for key in ("hookpoint", "model"):
        if not isinstance(cfg.get(key), str) or not cfg[key]:
            raise ConfigError(f"save_snmf: cfg needs '{key}' (a non-empty string)")
    F = torch.as_tensor(F)
    if F.ndim != 2:
        raise ConfigError(f"save_snmf: F has shape {tuple(F.shape)}, expected [d_mlp, K]")
    tensors = {"F": F.detach().float().cpu().contiguous()}
    if (G is None) != (tokens is None):
        raise ConfigError("save_snmf: G and tokens go together (codes need the windows they were fitted on)")
    if G is not None:
        G = torch.as_tensor(G).detach().float().cpu()
        tok = torch.as_tensor(np.asarray(tokens, dtype=np.int64)).to(torch.int32)
        if G.ndim != 2 or G.shape[1] != F.shape[1] or tok.ndim != 2 or tok.numel() != G.shape[0]:
            raise ConfigError(f"save_snmf: G {tuple(G.shape)} and tokens {tuple(tok.shape)} must be [windows·ctx, K] "
                              f"and [windows, ctx] with K={F.shape[1]}")
        if bool((G < 0).any()) or not bool(torch.isfinite(G).all()):
            raise ConfigError("save_snmf: G must be finite and non-negative")
        tensors.update(G=G.contiguous(), tokens=tok.contiguous())
    folder.mkdir(parents=True, exist_ok=True)
    meta = {k: v for k, v in cfg.items() if k != "tokens"}
    meta.update(d_mlp=int(F.shape[0]), n_features=int(F.shape[1]))
    save_file(tensors, str(folder / WEIGHTS))
    (folder / CFG).write_text(json.dumps(meta, indent=2))
    return folder


__all__ = ["SnmfDictionary", "SnmfFiles", "load_snmf", "nnls_gram", "save_snmf"]
