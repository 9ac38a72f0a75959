"""LLM calls, prompt characters and throughput of explain + detection + fuzzing through the path users run: a
JobSpec with the CLI's defaults (hard negatives on, the real MiniLM embedder, the cache's real windows), submitted
to the store and run by the embedded runner against the local OpenAI-compatible test server (a rule-based judge
answering after `--latency-ms`).

    python bench/llm_calls.py [--cache runs/bench-cache] [--latents 48] [--latency-ms 100] [--batch-sizes 20,10]

The cache is made once if missing: SmolLM2-135M, the demo SAE (2048 latents, resid_post.15) when it is already
trained, else top-32 sparsified MLP neurons of layer 15, over 60k tokens of builtin text, 64-token windows (the CLI
default). What it leaves out: the judge is a rule-based stand-in, so balanced accuracy here says nothing about a
real LLM; the server's latency is fixed (no queueing model). Each batch size runs on a fresh store and a fresh
pool-embedding file, so the first run's start-up includes embedding the negative pool once (reported separately).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from llm_server_fixture import start_llm_server  # noqa: E402


def ensure_cache(path: Path, n_tokens: int) -> Path:
    if (path / "manifest.json").is_file():
        return path
    from autointerp.demo import demo_dictionary_path
    from autointerp.extract import extract
    from autointerp.subject import load_subject

    subject = load_subject("builtin:smollm2")
    demo = demo_dictionary_path()
    dictionary, hookpoint = (str(demo), None) if demo.is_dir() else ("topk-neurons:32", "mlp_neurons.15")
    extract(subject, dictionary, hookpoint, "builtin", path, n_tokens=n_tokens, progress=False)
    return path


def run_once(cache: Path, latents: int, latency_ms: int, batch_size: int, concurrency: int) -> dict:
    from autointerp.jobs import run, submit
    from autointerp.jobs.export import export_rows
    from autointerp.store import open_store

    for f in cache.glob("pool_emb-*.npz"):  # the pool is embedded again: start-up as on a first run
        f.unlink()
    store = open_store(f"sqlite:///{tempfile.mkdtemp()}/bench.db")
    with start_llm_server(judge="judges:rule_judge", latency_ms=latency_ms) as srv:
        spec = {"dictionary": str(cache), "n_latents": latents, "explainer_model": f"openai:judge@{srv.base_url}",
                "scorers": ["detection", "fuzzing"], "concurrency": concurrency,
                "scorer_options": {"detection": {"batch_size": batch_size}, "fuzzing": {"batch_size": batch_size}},
                "llm": {"api_key_env": None, "response_cache": False}}
        t0 = time.perf_counter()
        job_id = submit(store, spec)
        t_submit = time.perf_counter() - t0
        from autointerp.jobs import job_context

        t1 = time.perf_counter()
        job_context(store, store.job(job_id))  # loads the cache, tokenizer, and embeds the pool (cached per process)
        t_ctx = time.perf_counter() - t1
        t2 = time.perf_counter()
        s = run(store, job_id, progress=False)
        t_run = time.perf_counter() - t2
        st = srv.stats()
    rows = list(export_rows(store, job_id=job_id))
    scores = [r for r in rows if r["type"] == "score" and not r["skipped"]]
    ba = [r["metrics"].get("balanced_accuracy") for r in scores if r["metrics"].get("balanced_accuracy") is not None]
    n = s.latents_done
    return {"batch_size": batch_size, "latents": n, "skipped": s.latents_skipped, "failed": s.latents_failed,
            "calls_per_latent": st["requests"] / max(1, n), "prompt_chars_per_latent": st["prompt_chars"] / max(1, n),
            "submit_s": t_submit, "startup_s": t_ctx, "run_s": t_run, "latents_per_s": n / t_run,
            "end_to_end_latents_per_s": n / (t_submit + t_ctx + t_run),
            "balanced_accuracy_mean": statistics.fmean(ba) if ba else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", type=Path, default=Path("runs/bench-cache"))
    ap.add_argument("--n-tokens", type=int, default=60_000)
    ap.add_argument("--latents", type=int, default=48)
    ap.add_argument("--latency-ms", type=int, default=100)
    ap.add_argument("--concurrency", type=int, default=8, help="latents in flight (the CLI default)")
    ap.add_argument("--batch-sizes", default="20,10")
    a = ap.parse_args()
    os.environ.setdefault("AUTOINTERP_LLM_CACHE", "off")
    cache = ensure_cache(a.cache, a.n_tokens)
    for bs in (int(x) for x in a.batch_sizes.split(",")):
        r = run_once(cache, a.latents, a.latency_ms, bs, a.concurrency)
        print(f"batch {r['batch_size']:>3}: {r['latents']} latents (+{r['skipped']} skipped, {r['failed']} failed); "
              f"{r['calls_per_latent']:.1f} calls and {r['prompt_chars_per_latent']:,.0f} prompt chars per latent; "
              f"submit {r['submit_s']:.1f} s, start-up (cache, tokenizer, pool embedding) {r['startup_s']:.1f} s, "
              f"run {r['run_s']:.1f} s = {r['latents_per_s']:.2f} latents/s "
              f"({r['end_to_end_latents_per_s']:.2f} end to end); rule judge balanced accuracy "
              f"{r['balanced_accuracy_mean']}")


if __name__ == "__main__":
    main()
