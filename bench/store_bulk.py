"""Bulk writes into the store: registering a dictionary's latents (what `extract` does at its end), inserting
explanations and scores, and the store's overhead per interpreted latent against the JSON-lines writer it replaced.

    python bench/store_bulk.py [--latents 1000000] [--explanations 100000] [--backends sqlite,postgresql]

What it leaves out: the latents' statistics come from a synthetic cache object with the real cache's interface
(manifest, stats, per-latent histograms of 80 bins, ~5 % of latents dead), not from an extraction (the extraction's
own cost is in bench/memory.py). PostgreSQL is the pgserver package's PostgreSQL 16 on a Unix socket, on this
machine. "Per interpreted latent" writes what one latent of explain + detection + fuzzing writes: an explanation,
two scores with ~100 per-example details each, three job-item updates — through the same Store methods the units
use, one transaction per unit, as the runner does.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np


class SyntheticCache:
    """The part of LatentCache that Store.register_cache reads."""

    def __init__(self, n_latents: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.n_latents, self.n_tokens, self.ctx_len = n_latents, 1_000_000, 64
        self.path = Path(tempfile.mkdtemp(prefix="synthetic-cache-"))
        n_active = rng.zipf(1.6, n_latents).clip(max=50_000).astype(np.int64)
        n_active[rng.random(n_latents) < 0.05] = 0
        self.stats = {"n_active": n_active, "act_sum": n_active * rng.uniform(1, 10, n_latents),
                      "act_max": rng.uniform(1, 50, n_latents) * (n_active > 0)}
        self._hist = rng.integers(0, 100, (n_latents, 80))
        self.manifest = {"model": "builtin:smollm2", "hookpoint": "resid_post.15",
                         "dictionary": {"id": f"synthetic-{n_latents}-{seed}", "format": "sparsify",
                                        "source": "synthetic", "n_latents": n_latents, "d_in": 576}}

    def array(self, name: str):
        assert name == "hist"
        return self._hist


def bench_register(store, n: int) -> float:
    cache = SyntheticCache(n)
    t = time.perf_counter()
    store.register_cache(cache)
    return time.perf_counter() - t


def bench_results(store, n_expl: int) -> tuple[float, float]:
    """(explanations/s, seconds per latent of explain + 2 scores + 3 item updates, one transaction per unit)."""
    from autointerp.jobs.spec import digest
    from autointerp.llm.base import Usage

    d = store.register_cache(SyntheticCache(max(n_expl, 1000), seed=1))
    usage = Usage(prompt_tokens=1500, completion_tokens=20, calls=1, cost_usd=0.0004)
    details = {"examples": [{"pred": 1, "label": 1, "quantile": q % 10} for q in range(100)], "n_calls": 5}
    job_id = store.create_job("bench", {"dictionary": "x"}, d["id"], None,
                              ((i, s) for i in range(n_expl) for s in ("explain", "score:detection", "score:fuzzing")))
    t = time.perf_counter()
    for i in range(n_expl):
        with store.tx(write=True) as conn:
            eid = store.insert_explanation(conn, {
                "dictionary_pk": d["id"], "latent": i, "explain_key": "k" * 32, "explainer": "default",
                "model": "m", "prompt_version": "explain_default@0123456789ab", "seed": 0,
                "text": f"fires on tokens about topic {i}", "examples_used": list(range(20)),
                "usage": usage.as_dict(), "cost_usd": usage.cost_usd, "job_id": job_id})
            store.finish_item(conn, job_id, i, "explain", "done", usage)
        for scorer in ("detection", "fuzzing"):
            with store.tx(write=True) as conn:
                store.insert_score(conn, {"explanation_id": eid, "score_key": digest(scorer), "scorer": scorer,
                                          "model": "m", "prompt_version": f"{scorer}@0123456789ab", "seed": 0,
                                          "value": 0.8, "metrics": {"balanced_accuracy": 0.8, "n": 100},
                                          "details": details, "usage": usage.as_dict(), "cost_usd": 0.0004,
                                          "job_id": job_id})
                store.finish_item(conn, job_id, i, f"score:{scorer}", "done", usage)
    dt = time.perf_counter() - t
    return n_expl / dt, dt / n_expl


def bench_jsonl(n: int) -> float:
    """Seconds per latent of the JSON-lines writer the store replaced: 4 rows appended + fsync per latent."""
    details = {"examples": [{"pred": 1, "label": 1, "quantile": q % 10} for q in range(100)], "n_calls": 5}
    path = Path(tempfile.mkdtemp()) / "results.jsonl"
    t = time.perf_counter()
    with path.open("a") as f:
        for i in range(n):
            rows = [{"type": "explanation", "latent": i, "text": f"fires on tokens about topic {i}"}] + \
                [{"type": "score", "latent": i, "scorer": s, "metrics": {"balanced_accuracy": 0.8}, "details": details}
                 for s in ("detection", "fuzzing")] + [{"type": "latent_usage", "latent": i}]
            f.write("".join(json.dumps(r) + "\n" for r in rows))
            f.flush()
            os.fsync(f.fileno())
    return (time.perf_counter() - t) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--latents", type=int, default=1_000_000)
    ap.add_argument("--explanations", type=int, default=2_000)
    ap.add_argument("--backends", default="sqlite,postgresql")
    a = ap.parse_args()
    from autointerp.store import open_store

    print(f"JSON-lines writer: {bench_jsonl(a.explanations) * 1e3:.2f} ms per latent")
    for backend in a.backends.split(","):
        if backend == "sqlite":
            url = f"sqlite:///{tempfile.mkdtemp()}/bench.db"
            srv = None
        else:
            import pgserver

            srv = pgserver.get_server(tempfile.mkdtemp(prefix="pg-bench-"), cleanup_mode="stop")
            url = srv.get_uri()
        store = open_store(url)
        dt = bench_register(store, a.latents)
        print(f"{backend}: registered {a.latents} latents' statistics in {dt:.1f} s ({a.latents / dt:,.0f} rows/s)")
        rate, per = bench_results(store, a.explanations)
        print(f"{backend}: {rate:,.0f} interpreted latents/s written (explanation + 2 scores + 3 items, "
              f"3 transactions): {per * 1e3:.2f} ms per latent")
        if srv is not None:
            srv.cleanup()


if __name__ == "__main__":
    main()
