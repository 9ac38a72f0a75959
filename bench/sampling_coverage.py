"""Do K top and S sampled windows per latent cover what sampling draws? One extraction with a large K/S, then
every latent sampled from it and from its prefix K'/S' (a top-K' is the first K' of the top-K; the reservoir of S'
is the first S' of the reservoir of S, both being sorted by key), comparing explainer sets, test sets and how
well each test set fills its deciles.

    python bench/sampling_coverage.py --latents 4096 --tokens 100000 --large 100 200 --small 50 100 25 50

Default sampling (20 explainer windows from the top, 50 test windows over 10 deciles); a random TopK SAE on
SmolLM2's resid_post.15 (the windows and activations are real; only the dictionary is random).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile

import numpy as np


def truncate(rec, k: int, s: int):
    return dataclasses.replace(rec, top=rec.top.take(np.arange(min(k, len(rec.top)))),
                               sample=rec.sample.take(np.arange(min(s, len(rec.sample)))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latents", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=100_000)
    ap.add_argument("--large", type=int, nargs=2, default=[100, 200])
    ap.add_argument("--small", type=int, nargs="+", default=[50, 100, 25, 50], help="K S pairs")
    ap.add_argument("--explain-from", default="top")
    args = ap.parse_args()
    sys.path.insert(0, "bench")
    import torch
    from memory import random_topk_sae

    from autointerp.extract import extract
    from autointerp.sampling import SamplingConfig, sample_latent
    from autointerp.subject import load_subject

    subject = load_subject("builtin:smollm2", device="cpu")
    sae = random_topk_sae(576, args.latents, 32, torch.float32)
    cfg = SamplingConfig(explain_from=args.explain_from)
    with tempfile.TemporaryDirectory() as d:
        (cache,) = extract(subject, sae, "resid_post.15", "builtin:code", d, n_tokens=args.tokens,
                           top_k=args.large[0], n_sample=args.large[1], progress=False)
        pairs = list(zip(args.small[::2], args.small[1::2]))
        stats = {p: {"same_explain": 0, "same_test": 0, "jaccard": [], "full_deciles": [], "skipped": 0}
                 for p in [tuple(args.large)] + pairs}
        n = 0
        for lat in cache.alive_latents():
            rec = cache.record(int(lat))
            ref = sample_latent(rec, cfg, seed=0)
            if not hasattr(ref, "test"):
                continue
            n += 1
            for p, st in stats.items():
                got = sample_latent(truncate(rec, *p), cfg, seed=0)
                if not hasattr(got, "test"):
                    st["skipped"] += 1
                    continue
                st["same_explain"] += set(got.explain.window_ids) == set(ref.explain.window_ids)
                a, b = set(got.test.window_ids.tolist()), set(ref.test.window_ids.tolist())
                st["same_test"] += a == b
                st["jaccard"].append(len(a & b) / len(a | b))
                st["full_deciles"].append(int((np.bincount(got.test_quantile, minlength=10) >= 5).sum()))
    print(f"{n} latents sampled with K={args.large[0]}, S={args.large[1]} (explain_from={args.explain_from}); "
          f"{args.tokens} tokens, {args.latents} latents")
    print(f"{'K':>4} {'S':>4} {'same explainer set':>19} {'same test set':>14} {'test Jaccard':>13} "
          f"{'deciles with 5':>15} {'skipped':>8}")
    for (k, s), st in stats.items():
        print(f"{k:>4} {s:>4} {st['same_explain'] / n:>19.3f} {st['same_test'] / n:>14.3f} "
              f"{np.mean(st['jaccard']):>13.3f} {np.mean(st['full_deciles']):>15.2f} {st['skipped']:>8}")


if __name__ == "__main__":
    main()
