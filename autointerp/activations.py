"""Collect raw hookpoint activations (for training small dictionaries; extraction itself never stores these)."""

from __future__ import annotations

import torch
from tqdm import tqdm

from .corpus import CorpusSpec, iter_windows
from .subject import SubjectModel


@torch.no_grad()
def collect_activations(subject: SubjectModel, hookpoint: str, spec: CorpusSpec, batch_size: int = 32,
                        progress: bool = True, max_norm_ratio: float = 5.0) -> torch.Tensor:
    """[N, d] float32 activations at `hookpoint` over the corpus, special-token positions (BOS, separators) dropped:
    their huge norms are artefacts of the sequence, not of the text, and would claim many latents. So are
    positions whose norm is over `max_norm_ratio` × the batch median (massive activations)."""
    hook = subject.hookpoint(hookpoint)
    chunks = []
    bar = tqdm(total=spec.n_windows * spec.ctx_len, unit="tok", unit_scale=True, disable=not progress,
               desc=f"activations {hookpoint}", dynamic_ncols=True)
    for batch in iter_windows(spec, subject.tokenizer, batch_size):
        ids = torch.from_numpy(batch).long()
        x = subject.capture(ids, [hook])[hook.name]
        keep = ~(subject.special_token_mask(ids).to(x.device) | subject.outlier_mask(x, max_norm_ratio))
        chunks.append(x[keep].float().cpu())
        bar.update(batch.size)
    bar.close()
    return torch.cat(chunks)
