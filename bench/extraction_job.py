"""Extraction as a job (issue 17): throughput of a sharded job run by 2 worker processes vs the one-process CLI
extraction of the same settings, the store's bytes per alive latent for examples, and the per-latent read time an
LLM worker pays for them (store rows vs the memory-mapped cache folder).

    python bench/extraction_job.py [--n-tokens 65536] [--dictionary topk-neurons:32 --hookpoint mlp_neurons.15]

What it runs: the user's paths — `extract()` as the CLI calls it, and a job spec with `extraction` submitted to a
SQLite store and run by two `autointerp job run` processes (each leases shards; one merges). The subject model
loads in each process (counted in the job's wall time: a real worker pays it once per process, not per shard).
Prints one line per figure; docs/benchmarks.md records them with the machine's state.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-tokens", type=int, default=65536)
    ap.add_argument("--ctx-len", type=int, default=64)
    ap.add_argument("--dictionary", default="topk-neurons:32")
    ap.add_argument("--hookpoint", default="mlp_neurons.15")
    ap.add_argument("--shards", type=int, default=4)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tmp = Path(tempfile.mkdtemp(prefix="bench-extraction-job-"))
    db = f"sqlite:///{tmp / 'store.db'}"
    env = {**os.environ, "AUTOINTERP_DATABASE_URL": db, "AUTOINTERP_LLM_CACHE": "off"}

    # 1. the one-process CLI extraction (model load included, as a user runs it)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "autointerp.cli", "extract", "--model", "builtin:smollm2", "--dictionary",
                    args.dictionary, "--hookpoint", args.hookpoint, "--corpus", "builtin", "--n-tokens",
                    str(args.n_tokens), "--ctx-len", str(args.ctx_len), "--out", str(tmp / "cli")],
                   check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cli_s = time.perf_counter() - t0

    # 2. the same extraction as a job, run by two processes (shards leased in the store; one of them merges)
    spec = {"extraction": {"model": "builtin:smollm2", "dictionary": args.dictionary, "hookpoint": args.hookpoint,
                           "corpus": "builtin", "n_tokens": args.n_tokens, "ctx_len": args.ctx_len,
                           "shards": args.shards},
            "explainer": "token_frequency", "scorers": [], "n_latents": 1, "hard_negatives": False}
    (tmp / "spec.json").write_text(json.dumps(spec))
    job_id = subprocess.run([sys.executable, "-m", "autointerp.cli", "job", "submit", str(tmp / "spec.json")],
                            check=True, env=env, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-m", "autointerp.cli", "job", "run", job_id], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(2)]
    codes = [p.wait() for p in procs]
    job_s = time.perf_counter() - t0
    if any(codes):
        raise SystemExit(f"job run exited {codes}")

    from sqlalchemy import func, select

    from autointerp.cache import LatentCache
    from autointerp.jobs import status
    from autointerp.store import open_store
    from autointerp.store.examples import StoredCache
    from autointerp.store.tables import ExampleWindow, LatentExample

    store = open_store(db)
    st = status(store, int(job_id))
    d = store.dictionary(store.job(int(job_id))["dictionary_pk"])
    with store.tx() as c:
        lex = c.execute(select(func.sum(func.length(LatentExample.__table__.c.data)))
                        .where(LatentExample.__table__.c.dictionary_pk == d["id"])).scalar() or 0
        win = c.execute(select(func.sum(func.length(ExampleWindow.__table__.c.tokens)))
                        .where(ExampleWindow.__table__.c.dictionary_pk == d["id"])).scalar() or 0
    alive = max(1, d["n_alive"])
    print(f"tokens {args.n_tokens:,}  dictionary {args.dictionary} @ {args.hookpoint}  shards {args.shards}")
    print(f"one-process CLI extract: {cli_s:.1f} s  ({args.n_tokens / cli_s:,.0f} tokens/s incl. model load)")
    print(f"job, 2 processes: {job_s:.1f} s  ({args.n_tokens / job_s:,.0f} tokens/s incl. model load x2 and merge)"
          f"  ratio job/CLI throughput {cli_s / job_s:.2f}x; shard rate {st.extraction['tokens_per_s']} tokens/s")
    print(f"store bytes per alive latent: {(lex + win) / alive:,.0f} (blobs {lex / alive:,.0f} + windows "
          f"{win / alive:,.0f}; {alive:,} alive of {d['n_latents']:,})")

    stored, folder = StoredCache(store, d), LatentCache(tmp / "cli")
    lat = [int(i) for i in stored.alive_latents()[:: max(1, alive // 200)]]
    for name, src in (("store (SQLite)", stored), ("cache folder", folder)):
        src.record(lat[0])  # warm: pool index, file handles
        t0 = time.perf_counter()
        for i in lat:
            src.record(i)
        print(f"per-latent read ({name}): {(time.perf_counter() - t0) / len(lat) * 1e3:.2f} ms over {len(lat)} "
              "latents (top + sample + negatives)")
    same = all(np.array_equal(stored.record(i).top.acts, folder.record(i).top.acts) for i in lat[:20])
    print(f"job examples equal the CLI's: {same}")


if __name__ == "__main__":
    main()
