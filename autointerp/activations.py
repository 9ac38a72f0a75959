"""Collect raw hookpoint activations (for training small dictionaries; extraction itself never stores these)."""

from __future__ import annotations

import torch
from tqdm import tqdm

from .corpus import CorpusSpec, iter_windows
from .subject import SubjectModel


@torch.no_grad()
def collect_activations(subject: SubjectModel, hookpoint: str, spec: CorpusSpec, batch_size: int = 32,
                        progress: bool = True) -> torch.Tensor:
    """[N, d] float32 activations at `hookpoint` over the corpus, BOS positions dropped (their huge norms are an
    artefact of the sequence start, not of the text)."""
    hook = subject.hookpoint(hookpoint)
    chunks = []
    bar = tqdm(total=spec.n_windows * spec.ctx_len, unit="tok", unit_scale=True, disable=not progress,
               desc=f"activations {hookpoint}", dynamic_ncols=True)
    for batch in iter_windows(spec, subject.tokenizer, batch_size):
        x = subject.capture(torch.from_numpy(batch).long(), [hook])[hook.name]
        if spec.bos:
            x = x[:, 1:]
        chunks.append(x.reshape(-1, x.shape[-1]).float().cpu())
        bar.update(batch.size)
    bar.close()
    return torch.cat(chunks)
