"""LLM calls, prompt characters and throughput of explain + detection + fuzzing through the path users run: a
JobSpec with the CLI's defaults (hard negatives on, the real MiniLM embedder, the cache's real windows), submitted
to the store and run by the embedded runner against the local OpenAI-compatible test server (a rule-based judge
answering after `--latency-ms`).

    python bench/llm_calls.py [--cache runs/bench-cache] [--latents 48] [--latency-ms 100]
                              [--batch-sizes 34/25,20/20] [--display-ctx 32,0]

`--batch-sizes`: detection/fuzzing examples per call ("default" = the scorers' defaults, "N" = both N);
`--display-ctx`: tokens of each window that prompts show (SamplingConfig.display_ctx; 0 = the whole stored window).
Every combination runs; for each display length it also reports what the crop keeps of the test and explainer
windows' activations (computed from the sampled sets, no LLM): the share of fuzzing highlights (tokens above 0.3 x
the window's max) and of explainer highlights (above 0.3 x the latent's max) inside the display window, and of the
activation mass; the peak is inside by construction (checked).

The cache is made once if missing: SmolLM2-135M, the demo SAE (2048 latents, resid_post.15) when it is already
trained, else top-32 sparsified MLP neurons of layer 15, over 60k tokens of builtin text, 64-token windows (the CLI
default). What it leaves out: the judge is a rule-based stand-in, so balanced accuracy here says nothing about a
real LLM; the server's latency is fixed (no queueing model). Each run uses a fresh store and a fresh
pool-embedding file, so its start-up includes embedding the negative pool once (reported separately).
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


def crop_coverage(cache: Path, latents: int, display_ctx: int) -> dict:
    """What the display windows keep of the activating windows that prompts show (explainer + test sets)."""
    from autointerp.cache import LatentCache
    from autointerp.sampling import SamplingConfig, display_view, sample_latent

    c = LatentCache(cache)
    fuzz, expl, mass = [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]
    n_win = 0
    for lat in [int(i) for i in c.alive_latents()][:latents]:
        s = sample_latent(c.record(lat), SamplingConfig(display_ctx=display_ctx), 0, explain_negatives=False)
        if not hasattr(s, "test"):
            continue
        for part in (s.explain, s.test):
            shown = display_view(part, display_ctx, s.seed, activating=True)
            assert (shown.max_acts == part.max_acts).all()  # the peak is always displayed
            whole, kept = part.acts, shown.acts
            wmax = whole.max(axis=1, keepdims=True)
            for acc, thr in ((fuzz, 0.3 * wmax), (expl, 0.3 * s.max_act)):
                acc[0] += int((whole > thr).sum())
                acc[1] += int((kept > thr).sum())
            mass[0] += float(whole.sum())
            mass[1] += float(kept.sum())
            n_win += len(part)
    return {"windows": n_win, "fuzzing_highlights_kept": fuzz[1] / max(fuzz[0], 1),
            "explainer_highlights_kept": expl[1] / max(expl[0], 1), "activation_mass_kept": mass[1] / max(mass[0], 1e-9)}


def run_once(cache: Path, latents: int, latency_ms: int, batch_sizes: tuple[int, int] | None, display_ctx: int,
             concurrency: int) -> dict:
    from autointerp.jobs import run, submit
    from autointerp.jobs.export import export_rows
    from autointerp.store import open_store

    for f in cache.glob("pool_emb-*.npz"):  # the pool is embedded again: start-up as on a first run
        f.unlink()
    store = open_store(f"sqlite:///{tempfile.mkdtemp()}/bench.db")
    with start_llm_server(judge="judges:rule_judge", latency_ms=latency_ms) as srv:
        spec = {"dictionary": str(cache), "n_latents": latents, "explainer_model": f"openai:judge@{srv.base_url}",
                "scorers": ["detection", "fuzzing"], "concurrency": concurrency,
                "sampling": {"display_ctx": display_ctx},
                "llm": {"api_key_env": None, "response_cache": False}}
        if batch_sizes:
            spec["scorer_options"] = {"detection": {"batch_size": batch_sizes[0]},
                                      "fuzzing": {"batch_size": batch_sizes[1]}}
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
    ba = {name: [r["metrics"]["balanced_accuracy"] for r in scores
                 if r["scorer"] == name and r["metrics"].get("balanced_accuracy") is not None]
          for name in ("detection", "fuzzing")}
    n = s.latents_done
    return {"batch_size": "default" if not batch_sizes else "/".join(map(str, batch_sizes)),
            "display_ctx": display_ctx, "latents": n, "skipped": s.latents_skipped, "failed": s.latents_failed,
            "calls_per_latent": st["requests"] / max(1, n), "prompt_chars_per_latent": st["prompt_chars"] / max(1, n),
            "submit_s": t_submit, "startup_s": t_ctx, "run_s": t_run, "latents_per_s": n / t_run,
            "end_to_end_latents_per_s": n / (t_submit + t_ctx + t_run),
            "balanced_accuracy": {k: round(statistics.fmean(v), 3) if v else None for k, v in ba.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", type=Path, default=Path("runs/bench-cache"))
    ap.add_argument("--n-tokens", type=int, default=60_000)
    ap.add_argument("--latents", type=int, default=48)
    ap.add_argument("--latency-ms", type=int, default=100)
    ap.add_argument("--concurrency", type=int, default=8, help="latents in flight (the CLI default)")
    ap.add_argument("--batch-sizes", default="default", help="detection/fuzzing per call: 34/25, 20 (both), default")
    ap.add_argument("--display-ctx", default="32", help="comma-separated display window lengths (0 = whole)")
    a = ap.parse_args()
    os.environ.setdefault("AUTOINTERP_LLM_CACHE", "off")
    cache = ensure_cache(a.cache, a.n_tokens)
    batches = []
    for x in a.batch_sizes.split(","):
        d, _, f = x.partition("/")
        batches.append(None if x == "default" else (int(d), int(f or d)))
    for dc in (int(x) for x in a.display_ctx.split(",")):
        cov = crop_coverage(cache, a.latents, dc)
        print(f"display {dc}: over {cov['windows']} explainer+test windows, the display window keeps "
              f"{cov['fuzzing_highlights_kept']:.1%} of fuzzing highlights, {cov['explainer_highlights_kept']:.1%} of "
              f"explainer highlights, {cov['activation_mass_kept']:.1%} of activation mass (peak: 100%)", flush=True)
        for bs in batches:
            r = run_once(cache, a.latents, a.latency_ms, bs, dc, a.concurrency)
            print(f"display {dc}, batch {r['batch_size']}: {r['latents']} latents (+{r['skipped']} skipped, "
                  f"{r['failed']} failed); {r['calls_per_latent']:.2f} calls and {r['prompt_chars_per_latent']:,.0f} "
                  f"prompt chars per latent; submit {r['submit_s']:.1f} s, start-up (cache, tokenizer, pool embedding) "
                  f"{r['startup_s']:.1f} s, run {r['run_s']:.1f} s = {r['latents_per_s']:.2f} latents/s "
                  f"({r['end_to_end_latents_per_s']:.2f} end to end); rule judge mean balanced accuracy "
                  f"{r['balanced_accuracy']}", flush=True)


if __name__ == "__main__":
    main()
