"""Peak RSS of a whole extraction at several token counts (it must stay flat: memory is bounded by
latents × examples, never by tokens), plus the cache's disk bytes per latent.

    python bench/memory.py --tokens 100000 300000 1000000

Each size runs in a fresh process (peak RSS = ru_maxrss of that process). Shallow hookpoint and a random 4096-latent
TopK SAE keep the 1M-token run to minutes on a laptop CPU; the collector's buffers are the same as at any depth.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time


def one(n_tokens: int, latents: int, hookpoint: str) -> dict:
    sys.path.insert(0, "bench")
    from extract_overhead import random_topk_sae

    from autointerp.extract import extract
    from autointerp.subject import load_subject

    subject = load_subject("builtin:smollm2", device="cpu")
    sae = random_topk_sae(subject.width(hookpoint), latents, 32, subject.device)
    sae.id = f"random-{latents}"
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        (cache,) = extract(subject, sae, hookpoint, "builtin:code", d, n_tokens=n_tokens, batch_size=32,
                           progress=False)
        elapsed = time.perf_counter() - t
        disk = cache.disk_bytes()
    return {"n_tokens": cache.n_tokens, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "seconds": round(elapsed, 1), "disk_bytes_per_latent": disk / latents, "latents": latents}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[100_000, 300_000, 1_000_000])
    ap.add_argument("--latents", type=int, default=4096)
    ap.add_argument("--hookpoint", default="resid_post.1")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.latents, args.hookpoint)))
        return
    rows = []
    for n in args.tokens:
        out = subprocess.run([sys.executable, __file__, "--one", str(n), "--latents", str(args.latents),
                              "--hookpoint", args.hookpoint], check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    base = rows[0]["peak_rss_mb"]
    print(f"\n{'tokens':>10} {'peak RSS MB':>12} {'vs first':>9} {'seconds':>8} {'disk B/latent':>14}")
    for r in rows:
        print(f"{r['n_tokens']:>10} {r['peak_rss_mb']:>12.0f} {r['peak_rss_mb'] / base:>8.3f}x {r['seconds']:>8} "
              f"{r['disk_bytes_per_latent']:>14.0f}")


if __name__ == "__main__":
    main()
