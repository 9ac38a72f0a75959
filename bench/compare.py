"""Compare two 32k-latent dictionaries (autointerp.compare): wall time and peak memory of the decoder/encoder cosine
matching (Paulo & Belrose's shared fraction) and of explanation-embedding matching — and what the shared fraction
reads on dictionaries that share nothing vs dictionaries that share a known part, so the numbers mean something.

Dictionaries (synthetic, d_in 768 like Pythia-160m): "random" = two independent random inits (Gaussian rows);
"planted" = B re-draws a share `--share` of A's latents as noisy copies (noise sigma per coordinate `--noise`
relative to unit rows: cosine ~0.9 with the original) in decoder and encoder independently, the rest random, rows
shuffled. Explanations: MiniLM embeddings from bench/search.py's cache, its real texts split in two disjoint halves;
A = 32k rows from the first half (its real vectors, then real + noise as in bench/search.py), B = the same share of
A's rows as noisy copies (sigma 0.025, cosine ~0.9), the rest 32k rows made the same way from the second half.

  python bench/compare.py --n 32768 --d-in 768
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

from autointerp.compare import compare_directions, compare_explanations
from autointerp.vector_index import unit_rows


def planted(a: np.ndarray, share: float, noise: float, rng: np.random.Generator,
            others: np.ndarray | None = None) -> np.ndarray:
    """B: the first `share` of A's rows + noise, the rest `others` (default random), rows shuffled."""
    n, d = a.shape
    b = unit_rows(rng.standard_normal((n, d), dtype=np.float32)) if others is None else others.copy()
    m = int(share * n)
    b[:m] = unit_rows(a[:m] + noise * rng.standard_normal((m, d), dtype=np.float32))
    return b[rng.permutation(n)]


def timed(label: str, fn):
    """fn's result and wall seconds; prints the process CPU seconds and the load average beside them (on a shared
    machine wall time is an upper bound; CPU seconds / cores is what an idle machine would approach)."""
    t, cpu = time.perf_counter(), time.process_time()
    out = fn()
    dt, dcpu = time.perf_counter() - t, time.process_time() - cpu
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"{label}: {dt:.1f} s wall, {dcpu:.1f} s CPU, load average {load}, peak RSS so far "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB", flush=True)
    return out, dt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=32768)
    p.add_argument("--d-in", type=int, default=768)
    p.add_argument("--share", type=float, default=0.5)
    p.add_argument("--noise", type=float, default=0.017)  # 0.017 * sqrt(768) = 0.47 -> cosine ~0.9
    p.add_argument("--skip-explanations", action="store_true")
    p.add_argument("--skip-directions", action="store_true")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    n, d = args.n, args.d_in
    unit = lambda: unit_rows(rng.standard_normal((n, d), dtype=np.float32))  # noqa: E731
    out = {}
    if not args.skip_directions:
        dec_a, enc_a = unit(), unit()
        res, dt = timed("random: decoder + encoder", lambda: compare_directions(dec_a, unit(), enc_a, unit()))
        out["random"] = {"seconds": round(dt, 1), "shared_fraction": res.shared_fraction,
                         "decoder": res.decoder.summary, "encoder": res.encoder.summary}
        dec_b = planted(dec_a, args.share, args.noise, np.random.default_rng(1))
        enc_b = planted(enc_a, args.share, args.noise, np.random.default_rng(1))  # same seed: same rows, shuffle
        res, dt = timed("planted: decoder + encoder", lambda: compare_directions(dec_a, dec_b, enc_a, enc_b))
        out["planted"] = {"seconds": round(dt, 1), "shared_fraction": res.shared_fraction,
                          "same_partner_fraction": res.same_partner_fraction,
                          "decoder": res.decoder.summary, "encoder": res.encoder.summary}
    if not args.skip_explanations:
        sys.path.insert(0, str(Path(__file__).parent))
        from search import dataset, real_vectors  # noqa: E402 (bench/search.py's cached real embeddings)

        real = real_vectors()  # two disjoint halves of the texts: A's, and B's other explanations
        emb_a, others = dataset(real[::2], n, 0.025), dataset(real[1::2], n, 0.025)
        emb_b = planted(emb_a, args.share, 0.025, np.random.default_rng(2), others)
        res, dt = timed("explanations", lambda: compare_explanations(emb_a, emb_b))
        out["explanations"] = {"seconds": round(dt, 1), "real_vectors": len(real), **res.summary}
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps({"n": n, "d_in": d, "share": args.share, **out}, indent=1))


if __name__ == "__main__":
    main()
