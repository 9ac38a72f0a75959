"""Peak RSS and disk per latent of whole extractions, each in a fresh process (peak RSS = ru_maxrss of that
process), for every combination of --latents × --ctx × --tokens. Memory must be flat in tokens and small per latent.

    python bench/memory.py --latents 16384 --ctx 64 --tokens 100000 1000000
    python bench/memory.py --latents 131072 1048576 --ctx 64 --tokens 100000 --encode-dtype bfloat16

The dictionary is a random TopK SAE (k=32) of the requested size at SmolLM2's resid_post.15 (d_in 576), built
directly in the encode dtype (a 1M-latent fp32 matrix is never made). Each row also shows the plan extract printed
before starting (its peak memory bound), so the bound can be checked against what was measured.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import resource
import subprocess
import sys
import tempfile
import time

import torch


def random_topk_sae(d_in: int, n: int, k: int, dtype: torch.dtype):
    """Encoder and decoder of n random unit-scale rows, generated 64k rows at a time straight into `dtype`."""
    from autointerp.dictionaries import LinearDictionary

    g = torch.Generator().manual_seed(0)

    def matrix():
        out = torch.empty(n, d_in, dtype=dtype)
        for r in range(0, n, 1 << 16):
            rows = min(1 << 16, n - r)
            out[r:r + rows] = torch.randn(rows, d_in, generator=g) / d_in**0.5
        return out
    sae = LinearDictionary(format="sparsify", source="random", id=f"random-{n}", hookpoint=None, transcoder=False,
                           W_enc=matrix(), b_enc=torch.zeros(n, dtype=dtype), W_dec=matrix(),
                           b_dec=torch.zeros(d_in, dtype=dtype), activation="relu_topk", k=k, subtract_b_dec=True)
    return sae


class _PlanLine(logging.Handler):
    def __init__(self):
        super().__init__()
        self.line = ""

    def emit(self, record):
        if record.getMessage().startswith("plan:"):
            self.line = record.getMessage()


def one(args, latents: int, ctx: int, n_tokens: int) -> dict:
    from autointerp.extract import extract
    from autointerp.subject import load_subject

    plan = _PlanLine()
    logging.getLogger("autointerp.extract").addHandler(plan)
    logging.getLogger("autointerp.extract").setLevel(logging.INFO)
    subject = load_subject("builtin:smollm2", device="cpu")
    sae = random_topk_sae(subject.width(args.hookpoint), latents, args.k, getattr(torch, args.encode_dtype))
    with tempfile.TemporaryDirectory(dir=args.tmp) as d:
        t = time.perf_counter()
        (cache,) = extract(subject, sae, args.hookpoint, "builtin:code", d, n_tokens=n_tokens, ctx_len=ctx,
                           batch_size=args.batch_size, top_k=args.top_k, n_sample=args.n_sample, progress=False,
                           encode_dtype=args.encode_dtype)
        elapsed = time.perf_counter() - t
        disk = cache.disk_bytes()
        alive = len(cache.alive_latents())
    return {"latents": latents, "ctx": ctx, "n_tokens": cache.n_tokens, "encode_dtype": args.encode_dtype,
            "top_k": args.top_k, "n_sample": args.n_sample, "alive": alive,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "seconds": round(elapsed, 1),
            "disk_mb": disk / 1e6, "disk_bytes_per_latent": disk / latents, "plan": plan.line}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latents", type=int, nargs="+", default=[16384])
    ap.add_argument("--ctx", type=int, nargs="+", default=[64])
    ap.add_argument("--tokens", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--hookpoint", default="resid_post.15")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=50)
    ap.add_argument("--n-sample", type=int, default=100)
    ap.add_argument("--encode-dtype", default="float32")
    ap.add_argument("--tmp", default=None, help="where the caches are written (and deleted)")
    ap.add_argument("--one", type=int, nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args, *args.one)))
        return
    rows = []
    passed = [a for a in sys.argv[1:]]
    for latents, ctx, n in itertools.product(args.latents, args.ctx, args.tokens):
        out = subprocess.run([sys.executable, __file__, *passed, "--one", str(latents), str(ctx), str(n)],
                             check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'latents':>8} {'ctx':>4} {'tokens':>9} {'dtype':>8} {'peak RSS MB':>11} {'planned MB':>10} "
          f"{'seconds':>8} {'disk MB':>8} {'B/latent':>9}")
    for r in rows:
        planned = r["plan"].split("<= ")[1].split(" GiB")[0] if r["plan"] else "?"
        planned = f"{float(planned) * 1024:.0f}" if planned != "?" else planned
        print(f"{r['latents']:>8} {r['ctx']:>4} {r['n_tokens']:>9} {r['encode_dtype']:>8} {r['peak_rss_mb']:>11.0f} "
              f"{planned:>10} {r['seconds']:>8} {r['disk_mb']:>8.1f} {r['disk_bytes_per_latent']:>9.0f}")


if __name__ == "__main__":
    main()
