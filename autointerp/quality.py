"""What a dictionary is worth: a quality pass over a slice of an extraction's token windows.

For each window the subject model runs four times over the whole sequence (LM head included):
  clean          as it is; its activations at the hookpoint are read (x; for a transcoder the MLP's input and output)
  spliced        the activation replaced by the dictionary's reconstruction x̂ (a transcoder: its prediction of the
                 MLP's output from the MLP's input, spliced in at the output)
  with error     replaced by x̂ + (x − x̂), which is x again: its loss must equal the clean loss (the sanity check
                 that the splice replaces what was read, where it was read)
  zero-ablated   replaced by zeros
From these: next-token loss of each, KL(clean || spliced) per token, loss recovered = (L_zero − L_spliced) /
(L_zero − L_clean) (1 = as good as the model, 0 = as bad as deleting the activation). The reconstruction itself
gives the fraction of variance unexplained FVU = Σ‖x − x̂‖² / Σ‖x − mean(x)‖² (mean over the slice) and L0 (latents
firing per token, mean and histogram). Dead and dense latent fractions come from the whole extraction's statistics.

Positions the extraction ignores (special tokens and massive-activation outliers, `extract.collect_batch`) are
ignored here too: never replaced (the BOS attention sink's activation is left as it is), never counted in FVU or L0;
a next-token loss counts where neither the input token nor the predicted one is a special token.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import ExitStack

import numpy as np
import torch
import torch.nn.functional as F

from .dictionaries.base import ENCODE_CHUNK_BYTES
from .steering import replace
from .subject import SubjectModel, mlp_read_and_write

log = logging.getLogger(__name__)

DENSE_FREQUENCY = 0.1  # a latent firing at more than 10 % of tokens is "dense"
L0_BINS = 32
LOGIT_BYTES = 256 << 20  # float32 logits one forward may hold: the windows per forward are cut to fit
QUALITY_FRACTION = 0.005  # of an extraction's tokens, by default (see default_quality_tokens)
MAX_QUALITY_TOKENS = 1 << 20  # past a million tokens the estimates are as good as they get; the cost is not


def default_quality_tokens(n_tokens: int) -> int:
    """Tokens the quality pass reads when not told: the first 0.5 % of the extraction (at least one window, at most
    MAX_QUALITY_TOKENS). The pass runs the whole model, LM head included, four times per token where the extraction
    runs it once to the hookpoint: a pass token cost ~13 extraction tokens with the demo SAE on a CPU, so 0.5 %
    costs ~6-7 % of the extraction (bench/quality_cost.py, docs/benchmarks.md)."""
    return min(MAX_QUALITY_TOKENS, max(1, math.ceil(QUALITY_FRACTION * n_tokens)))


def latent_usage(n_active, n_tokens: int) -> dict:
    """Dead (never fired) and dense (firing frequency > 10 %) fractions of the extraction's units, from the
    collector's statistics (n_active per unit over n_tokens tokens)."""
    n_active = np.asarray(n_active.cpu() if isinstance(n_active, torch.Tensor) else n_active, dtype=np.int64)
    freq = n_active / max(1, int(n_tokens))
    return {"n_units": int(n_active.size), "dead_fraction": float((n_active == 0).mean()) if n_active.size else 0.0,
            "dense_fraction": float((freq > DENSE_FREQUENCY).mean()) if n_active.size else 0.0,
            "dense_threshold": DENSE_FREQUENCY}


def l0_histogram(l0: np.ndarray, bins: int = L0_BINS) -> dict:
    """Counts of latents-per-token in integer bins [edges[i], edges[i+1]) of equal width."""
    if l0.size == 0:
        return {"edges": [], "counts": []}
    lo, hi = int(l0.min()), int(l0.max())
    width = max(1, math.ceil((hi - lo + 1) / bins))
    edges = lo + width * np.arange(math.ceil((hi - lo + 1) / width) + 1)
    counts = np.bincount((l0 - lo) // width, minlength=len(edges) - 1)
    return {"edges": edges.tolist(), "counts": counts.tolist()}


def _points(subject: SubjectModel, dictionary, hookpoint: str):
    """(where the dictionary reads, where its reconstruction is spliced in): the same hookpoint for an SAE; for a
    transcoder the MLP's input and what the MLP adds to the residual stream."""
    read = subject.hookpoint(hookpoint)
    if not getattr(dictionary, "transcoder", False):
        return read, read
    return read, subject.hookpoint(mlp_read_and_write(subject.model, read)[1])


@torch.no_grad()
def _reconstruct(dictionary, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x̂ [n, d_out] float32, latents firing per token [n]) for tokens x [n, d_in], a token chunk at a time: the
    dense codes never exceed ENCODE_CHUNK_BYTES."""
    rows = max(1, ENCODE_CHUNK_BYTES // (4 * dictionary.n_latents))
    outs, l0s = [], []
    for chunk in x.split(rows):
        l0s.append((dictionary.encode(chunk) != 0).sum(-1).cpu())
        outs.append(dictionary.reconstruct(chunk).to(x.device))
    if not outs:
        return x.new_zeros((0, dictionary.d_out), dtype=torch.float32), torch.zeros(0, dtype=torch.long)
    return torch.cat(outs), torch.cat(l0s)


def _token_losses(logits: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probabilities [B, T-1, V] float32, next-token loss [B, T-1])."""
    logp = logits[:, :-1].float().log_softmax(-1)
    return logp, -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)


@torch.no_grad()
def splice_quality(subject: SubjectModel, dictionary, hookpoint: str, windows, *, batch_size: int = 32,
                   max_norm_ratio: float = 5.0) -> dict:
    """Reconstruction and spliced-in loss of `dictionary` (as the extraction collected it: a `Poles` wrapper or the
    dictionary itself) at `hookpoint` over `windows` ([n, ctx_len] token ids)."""
    model, dev = subject.model, subject.device
    windows = np.asarray(windows)
    n_win, ctx = windows.shape
    read, write = _points(subject, dictionary, hookpoint)
    vocab = int(getattr(model.config, "vocab_size", None) or 1)
    # at once: the clean log-probs, and a run's logits, log-probs and KL terms
    step = max(1, min(batch_size, LOGIT_BYTES // (4 * ctx * vocab * 4)))
    sse = sq = 0.0
    s1 = None
    n_tok = 0
    l0s: list[np.ndarray] = []
    loss = {k: 0.0 for k in ("clean", "spliced", "with_error", "zero")}
    kl = 0.0
    n_pred = 0
    for w0 in range(0, n_win, step):
        ids = torch.from_numpy(windows[w0:w0 + step].astype(np.int64)).to(dev)
        got: dict[str, torch.Tensor] = {}

        def grab(name):
            def fn(v):
                got[name] = v
                return v
            return fn

        with ExitStack() as hooks:
            hooks.enter_context(replace(model, read, grab("x")))
            if write is not read:
                hooks.enter_context(replace(model, write, grab("y")))
            clean_logp, clean_loss = _token_losses(model(input_ids=ids, use_cache=False).logits, ids)
        x = got["x"]
        y = got.get("y", x)  # what is spliced over: x itself for an SAE, the MLP's output for a transcoder
        special = subject.special_token_mask(ids)
        keep = ~(special | subject.outlier_mask(x, max_norm_ratio))
        xhat_kept, l0 = _reconstruct(dictionary, x[keep])
        l0s.append(l0.numpy())
        yk = y[keep].double()
        sse += float((yk - xhat_kept.double()).pow(2).sum())
        sq += float(yk.pow(2).sum())
        s1 = yk.sum(0) if s1 is None else s1 + yk.sum(0)
        n_tok += int(keep.sum())
        xhat = y.float().clone()
        xhat[keep] = xhat_kept  # ignored positions keep their own activation

        lm = (~special[:, :-1] & ~special[:, 1:]).float()  # neither the input nor the predicted token is special
        n_pred += int(lm.sum())
        loss["clean"] += float((clean_loss * lm).sum())
        runs = {"spliced": lambda v: xhat.to(v.dtype),
                "with_error": lambda v: (xhat + (v.float() - xhat)).to(v.dtype),
                "zero": lambda v: v.masked_fill(keep[..., None], 0)}
        for name, fn in runs.items():
            with replace(model, write, fn):
                logp, run_loss = _token_losses(model(input_ids=ids, use_cache=False).logits, ids)
            loss[name] += float((run_loss * lm).sum())
            if name == "spliced":  # KL(clean || spliced), summed over the vocabulary at each counted position
                kl += float((F.kl_div(logp, clean_logp, reduction="none", log_target=True).sum(-1) * lm).sum())
            del logp
    mean = {k: v / max(1, n_pred) for k, v in loss.items()}
    var = sq - float((s1 * s1).sum()) / n_tok if n_tok else 0.0
    l0_all = np.concatenate(l0s) if l0s else np.zeros(0, np.int64)
    gap = mean["zero"] - mean["clean"]
    return {
        "n_windows": int(n_win), "n_tokens": n_tok, "n_predictions": n_pred,
        "hookpoint": hookpoint, "spliced_at": write.name,
        "l0": float(l0_all.mean()) if l0_all.size else None, "l0_hist": l0_histogram(l0_all),
        "fvu": sse / var if var > 0 else None,
        "loss_clean": mean["clean"], "loss_spliced": mean["spliced"], "loss_with_error": mean["with_error"],
        "loss_zero_ablated": mean["zero"], "kl_spliced": kl / max(1, n_pred),
        "loss_recovered": (mean["zero"] - mean["spliced"]) / gap if gap != 0 else None,
    }


def extraction_quality(subject: SubjectModel, dictionary, hookpoint: str, windows, *, run_tokens: int,
                       quality_tokens: int | None = None, n_active=None, n_tokens: int = 0, batch_size: int = 32,
                       max_norm_ratio: float = 5.0) -> dict:
    """The manifest's "quality" block of an extraction of `run_tokens` tokens: `splice_quality` over its first
    `quality_tokens` tokens of `windows` ([n, ctx_len], the run's windows in order), and, given the collector's
    `n_active` / `n_tokens`, the dead and dense fractions. A failure is recorded as "error", never raised: an
    extraction of hours is not lost to its quality pass."""
    windows = np.asarray(windows[:max(1, math.ceil((quality_tokens or default_quality_tokens(run_tokens))
                                                   / windows.shape[1]))])
    t0 = time.monotonic()
    try:
        q = splice_quality(subject, dictionary, hookpoint, windows, batch_size=batch_size,
                           max_norm_ratio=max_norm_ratio)
    except Exception as e:  # noqa: BLE001 — recorded in the manifest and logged
        log.warning("quality pass of %s at %s failed: %s", getattr(dictionary, "id", dictionary), hookpoint, e)
        q = {"error": f"{type(e).__name__}: {e}"[:500]}
    q["seconds"] = round(time.monotonic() - t0, 3)
    if n_active is not None:
        q.update(latent_usage(n_active, n_tokens))
    return q


# the rows `autointerp inspect`, `compare` and the dictionary page show, in this order: (key, label)
SHOWN = (("l0", "L0 (latents per token)"), ("fvu", "FVU"), ("loss_clean", "loss, clean"),
         ("loss_spliced", "loss, reconstruction spliced in"), ("loss_with_error", "loss, spliced + error term"),
         ("loss_zero_ablated", "loss, zero-ablated"), ("kl_spliced", "KL(clean || spliced)"),
         ("loss_recovered", "loss recovered"), ("dead_fraction", "dead latents"), ("dense_fraction", "dense latents (>10 %)"),
         ("n_tokens", "tokens evaluated"))


def quality_rows(*qualities: dict | None) -> list[tuple[str, list]]:
    """(label, [value per quality block]) for the shown keys any block has; None where a block lacks it."""
    qs = [q or {} for q in qualities]
    return [(label, [q.get(key) for q in qs]) for key, label in SHOWN if any(key in q for q in qs)]


def format_value(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool) or isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def quality_text(q: dict | None) -> str:
    """A manifest's quality block as `autointerp inspect` prints it (its rows, then the L0 histogram); "" when the
    extraction did not run the quality pass."""
    if not q:
        return ""
    lines = []
    if q.get("error"):
        lines.append(f"quality pass failed: {q['error']}")
    rows = quality_rows(q)
    if rows:
        lines.append(f"quality (first {q.get('n_windows', '?')} windows, spliced at {q.get('spliced_at', '?')}):")
        for label, (v,) in rows:
            lines.append(f"  {label:<34} {format_value(v)}")
    h = q.get("l0_hist") or {}
    if h.get("counts") and len(h["counts"]) > 1:
        peak = max(h["counts"]) or 1
        for lo, hi, n in zip(h["edges"], h["edges"][1:], h["counts"]):
            if n:
                lines.append(f"  L0 {lo:>6}..{hi - 1:<6} {n:>7} {'#' * max(1, round(30 * n / peak))}")
    return "\n".join(lines)
