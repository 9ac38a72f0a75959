"""Publish an SNMF fit's own codes G as a LatentCache: the cache `autointerp extract` writes, with G in place of
the dictionary's encode.

An SNMF folder (`dictionaries/snmf.py`) with `G` [windows·ctx, K] and the `tokens` [windows, ctx] it was fitted on
is fed, window batch by window batch, to the same `Collector` extraction uses (window ids = rows of `tokens`), and
written by extraction's own `_publish`: top windows by each factor's max code in them, the uniform sample, the
statistics and the random pool, in the same files and manifest. The manifest names the SNMF folder as its dictionary
(so explanation, scoring and steering reload F from it) and says the codes were imported, so that an extraction
of the same folder (NNLS codes) is never mistaken for this run.

    cache = import_snmf_codes("runs/snmf/mlp_neurons.5", "runs/snmf-cache")
"""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from .cache import LatentCache
from .collector import Collector, CollectorConfig
from .corpus import CorpusSpec
from .dictionaries.snmf import SnmfFiles
from .errors import ConfigError
from .extract import CACHE_FILES, Target, _Checkpoint, _check_out_dir, _identity, _manifest_extra, _publish
from .subject import SubjectModel, translate_hookpoint


def _corpus(files: SnmfFiles) -> CorpusSpec:
    """The corpus the windows came from, as the fit recorded it (fit_snmf_folder), sized to the windows held; a
    source naming the SNMF file otherwise."""
    rec = files.cfg.get("corpus")
    n_tokens = files.n_windows * files.ctx
    if isinstance(rec, dict):
        try:
            spec = CorpusSpec(**{**rec, "ctx_len": files.ctx, "n_tokens": n_tokens})
        except TypeError as e:
            raise ConfigError(f"{files.cfg_path}: field 'corpus' is not a corpus spec ({e})") from None
    else:
        spec = CorpusSpec(source=f"snmf-tokens:{files.path.resolve()}", ctx_len=files.ctx, n_tokens=n_tokens)
    spec.validate()
    return spec


@torch.no_grad()
def import_snmf_codes(folder: str | Path, out: str | Path, *, top_k: int = CollectorConfig.top_k,
                      n_sample: int = CollectorConfig.n_sample, pool_size: int = 1000, seed: int = 0,
                      batch_windows: int = 64, device: str = "cpu", overwrite: bool = False,
                      subject: SubjectModel | None = None) -> LatentCache:
    """Write the cache of the SNMF folder's fitted codes G to `out` (see the module docstring); returns it. A complete
    cache of the same import already there is returned as it is; a folder holding anything else is refused unless
    `overwrite`. `subject` (optional, the model the fit read): F's width is checked against its hookpoint and the
    manifest records it as extraction does; without it, the fit's cfg.json stands in (no model is loaded)."""
    from .dictionaries import load_dictionary

    folder, out = Path(folder), Path(out)
    d = load_dictionary(folder, format="snmf")  # checks the files; its id is what the cache reloads F from
    files = SnmfFiles(folder)
    if not files.has_codes:
        raise ConfigError(f"{files.path}: holds no codes 'G' to import (extract the dictionary instead)")
    if batch_windows < 1:
        raise ConfigError(f"batch_windows must be >= 1, got {batch_windows}")
    cfg = CollectorConfig(top_k=top_k, n_sample=n_sample, pool_size=pool_size, seed=seed)
    t = Target(d, translate_hookpoint(d.hookpoint), out)
    if subject is not None:
        width = subject.width(t.hookpoint)
        if width != d.d_in:
            raise ConfigError(f"{files.path}: F has d_mlp={d.d_in} rows but hookpoint {t.hookpoint} of "
                              f"{subject.spec or subject.name} has width {width}")
        if subject.spec and subject.spec != files.cfg["model"]:
            raise ConfigError(f"{files.cfg_path}: fitted on model {files.cfg['model']!r}, not {subject.spec!r}")
    # what extraction records of the subject; without one, the fit's record stands in (no model is needed to
    # publish codes)
    fit = subject if subject is not None else SimpleNamespace(
        spec=files.cfg["model"], dtype=files.cfg.get("model_dtype", "float32"), device=torch.device(device),
        model=None, tokenizer=SimpleNamespace(all_special_ids=files.cfg.get("ignored_token_ids") or []))
    t.identity = _identity(fit, t, _corpus(files), cfg, float(files.cfg.get("max_norm_ratio") or 0.0))
    # the codes are G, not the dictionary's encode: a different run from any extraction of this folder
    t.identity["ignored_positions"] = {**t.identity["ignored_positions"], "codes": "snmf G (imported)"}
    if _check_out_dir(t, overwrite) == "done":
        return LatentCache(out)

    tokens = files.tokens()
    if tokens.min(initial=0) < 0:
        raise ConfigError(f"{files.path}: tokens hold negative ids")
    collector = Collector(d.n_latents, files.ctx, cfg, device)
    lock = _Checkpoint(out, files.ctx)
    lock.lock()  # the same one-writer rule as extraction
    published = False
    try:
        if overwrite:
            for name in CACHE_FILES:
                (out / name).unlink(missing_ok=True)
        for w0 in range(0, files.n_windows, batch_windows):
            w1 = min(w0 + batch_windows, files.n_windows)
            G = files.G(slice(w0 * files.ctx, w1 * files.ctx))
            if not bool(torch.isfinite(G).all()) or bool((G < 0).any()):
                raise ConfigError(f"{files.path}: G rows {w0 * files.ctx}..{w1 * files.ctx - 1} hold negative or "
                                  "non-finite codes (SNMF codes are >= 0)")
            collector.update(G.reshape(w1 - w0, files.ctx, d.n_latents).to(device),
                             torch.arange(w0, w1, dtype=torch.int64, device=device))
        extra = {**_manifest_extra(fit), "imported_from": str(files.path.resolve())}
        _publish(t, collector, np.asarray(tokens, dtype=np.int32), extra)
        shutil.rmtree(out / ".partial", ignore_errors=True)
        published = True
    finally:
        lock.unlock(remove=published)
    return LatentCache(out)
