"""ITDA layer similarity on SmolLM2-135M (issue 18): ITDA dictionaries built at several resid_post layers from the
same token windows (autointerp.itda_build), then for every layer pair the Jaccard index of their atom-index sets
(autointerp.similarity.itda_jaccard), beside two references:

  chance   the Jaccard two dictionaries of these sizes would get if each picked its atoms at random from the stream,
           except the first greedy step, which joins whole in every layer (see itda_build): 64 shared tokens + the
           expected overlap of random draws from the rest.
  CKA      linear CKA (autointerp.similarity.linear_cka) of the two layers' ITDA codes, and of their raw activations,
           on held-out windows (the ones after the build's), BOS left out; then again without the tokens whose norm is
           over 5 × the median at any of the layers (SmolLM2's massive " the" activations at early layers).

  python bench/itda_layers.py --tokens 4096 --layers 3,8,13,14,15
"""

from __future__ import annotations

import argparse
import itertools
import os
import tempfile
import time

import numpy as np
import torch

from autointerp.corpus import CorpusSpec, iter_windows
from autointerp.dictionaries import load_dictionary
from autointerp.itda_build import DEFAULT_THRESHOLD, build_itda
from autointerp.similarity import itda_overlap, linear_cka
from autointerp.subject import load_subject


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096, help="tokens the dictionaries are built from")
    ap.add_argument("--held-out", type=int, default=1024, help="tokens after those, for CKA")
    ap.add_argument("--layers", default="3,8,13,14,15")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD)
    ap.add_argument("--max-atoms", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=1, help="sequences per greedy step")
    ap.add_argument("--ctx-len", type=int, default=64)
    ap.add_argument("--out", default=None, help="keep the dictionaries here (default: a temporary folder)")
    a = ap.parse_args()
    layers = [int(x) for x in a.layers.split(",")]

    t0 = time.perf_counter()
    subject = load_subject("builtin:smollm2", device="cpu")
    t_load = time.perf_counter() - t0
    spec = CorpusSpec(source="builtin", ctx_len=a.ctx_len, n_tokens=a.tokens)
    with tempfile.TemporaryDirectory() as tmp:
        out = a.out or tmp
        t0 = time.perf_counter()
        folders = build_itda(subject, layers, spec, out, k=a.k, threshold=a.threshold, max_atoms=a.max_atoms,
                             batch_size=a.batch_size)
        t_build = time.perf_counter() - t0
        dicts = {layer: load_dictionary(f) for layer, f in folders.items()}

        # held-out windows: the ones right after the build's in the same stream
        n_build = spec.n_windows
        allw = np.concatenate(list(iter_windows(CorpusSpec(source="builtin", ctx_len=a.ctx_len,
                                                           n_tokens=a.tokens + a.held_out), subject.tokenizer, 64)))
        held = torch.from_numpy(allw[n_build:]).long()
        t0 = time.perf_counter()
        got = subject.capture(held, [f"resid_post.{layer}" for layer in layers])
        mask = ~subject.special_token_mask(held).reshape(-1)  # BOS: a massive-norm constant, not text
        acts = {layer: got[f"resid_post.{layer}"].reshape(-1, dicts[layer].d_in)[mask].float() for layer in layers}
        codes = {layer: dicts[layer].encode(acts[layer]).numpy() for layer in layers}
        # tokens with a massive norm at any of the layers (the extraction's rule: > 5 × the median), dropped for
        # the second pair of CKA columns: linear CKA is a sum over token pairs, and a few huge ones dominate it
        clean = ~torch.stack([subject.outlier_mask(acts[layer], 5.0) for layer in layers]).any(0).numpy()
        t_cka = time.perf_counter() - t0

    n_stream = spec.n_windows * a.ctx_len
    print(f"SmolLM2-135M resid_post, {n_stream} tokens ({spec.n_windows} windows of {a.ctx_len}, builtin corpus), "
          f"k={a.k}, threshold={a.threshold:g}, max atoms {a.max_atoms}, {a.batch_size} sequence(s) per step; "
          f"CKA on {int(mask.sum())} held-out tokens ({int((~clean).sum())} of them outliers at some layer)")
    print("atoms per layer: " + ", ".join(f"{layer}: {d.n_latents}" for layer, d in dicts.items()))
    print()
    print("| pair | layers apart | atoms A / B | shared | Jaccard | chance | CKA codes | CKA activations | "
          "CKA codes, no outliers | CKA activations, no outliers |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for la, lb in sorted(itertools.combinations(layers, 2), key=lambda p: (p[1] - p[0], p)):
        o = itda_overlap(dicts[la], dicts[lb])
        first = a.ctx_len * a.batch_size  # the first step joins whole in both
        ra, rb, rest = o["n_a"] - first, o["n_b"] - first, n_stream - first
        inter = first + ra * rb / rest
        chance = inter / (o["n_a"] + o["n_b"] - inter)
        cka_c = linear_cka(codes[la], codes[lb])
        xa, xb = acts[la].numpy(), acts[lb].numpy()
        cka_x = linear_cka(xa, xb)
        cka_c0 = linear_cka(codes[la][clean], codes[lb][clean])
        cka_x0 = linear_cka(xa[clean], xb[clean])
        print(f"| {la} vs {lb} | {lb - la} | {o['n_a']} / {o['n_b']} | {o['shared']} | {o['jaccard']:.3f} | "
              f"{chance:.3f} | {cka_c:.3f} | {cka_x:.3f} | {cka_c0:.3f} | {cka_x0:.3f} |")
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\nsubject load {t_load:.1f} s, build (forward + greedy, all layers) {t_build:.1f} s, held-out capture + "
          f"encode {t_cka:.1f} s; load average {load}")


if __name__ == "__main__":
    main()
