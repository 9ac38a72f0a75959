"""HTTP API under load: GET one latent and a search query, requests/s and latency percentiles, from a second process.

    python bench/api_load.py [--latents 100000] [--explained 20000] [--seconds 15] [--connections 8]
                             [--workers 1] [--backends sqlite,postgresql] [--loadgen auto|wrk|python]

The store: one dictionary of `--latents` latents (synthetic statistics and 80-bin histograms, as in
bench/store_bulk.py), `--explained` of them with an LLM explanation and two scores (detection, fuzzing), plus a real
extraction cache (SmolLM2 layer-2 MLP neurons, 1536 latents, built once into the bench folder) registered beside it,
so "GET latent with examples" reads display contexts from a real cache and decodes their tokens.

The server: `autointerp serve` (uvicorn, `--workers` processes) in its own process. GET latent is measured twice:
on 500 latents drawn from the explained ones (after the warm-up their answers come from the server's response cache,
checked against the store on every request) and with that cache off (AUTOINTERP_API_LATENT_CACHE_MB=0: every
request reads and serialises its latent), the cost of a latent nobody asked for recently.

The load: another process with `--connections` keep-alive HTTP/1.1 connections, each sending its next request as
soon as the previous answer is read (closed loop), for `--seconds` after a 2-second warm-up. `wrk` (C, one thread,
a Lua script drawing the paths at random) when it is installed (`apt-get install wrk`), as it leaves the server more
of a small machine's CPUs than a Python client; else a Python client (one thread per connection). The table says
which one measured. Both share this machine's CPUs, as on a 2-core laptop.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def build_store(url: str, n_latents: int, n_explained: int, work: Path) -> dict:
    from store_bulk import SyntheticCache

    from autointerp.jobs.spec import digest
    from autointerp.store import open_store
    from autointerp.store.store import T_EXPL, T_SCORE

    store = open_store(url)
    t = time.perf_counter()
    d = store.register_cache(SyntheticCache(n_latents), name=f"synthetic-{n_latents}")
    rng = np.random.default_rng(0)
    words = ["numbers", "dates", "French", "code", "brackets", "names", "cities", "verbs", "money", "plural nouns",
             "questions", "negation", "legal text", "recipes", "sports", "HTML tags", "emotions", "colours"]
    latents = np.sort(rng.choice(n_latents, n_explained, replace=False))
    ek = digest({"bench": "llm"})
    with store.tx(write=True) as conn:
        rows = [{"dictionary_pk": d["id"], "latent": int(i), "explain_key": ek, "explainer": "default",
                 "model": "Qwen/Qwen2.5-7B-Instruct", "prompt_version": "explain_default@0123456789ab", "seed": 0,
                 "text": f"{words[i % len(words)]} and {words[(i * 7 + 3) % len(words)]} in context {i % 97}",
                 "parsed": True, "examples_used": [], "usage": {"calls": 1}, "cost_usd": 0.0004,
                 "created": None} for i in latents]
        for r in rows:
            r.pop("created")
        for lo in range(0, len(rows), 5000):
            conn.execute(T_EXPL.insert(), rows[lo:lo + 5000])
        ids = conn.execute(T_EXPL.select().with_only_columns(T_EXPL.c.id).where(
            T_EXPL.c.dictionary_pk == d["id"])).scalars().all()
        sc = [{"explanation_id": int(e), "score_key": digest({"s": s}), "scorer": s, "model": "judge",
               "prompt_version": f"{s}@v1", "seed": 0, "value": float(v), "metrics": {"balanced_accuracy": float(v)},
               "details": {}, "usage": {}, "cost_usd": 0.0002}
              for e in ids for s, v in (("detection", rng.uniform(0.4, 1)), ("fuzzing", rng.uniform(0.4, 1)))]
        for lo in range(0, len(sc), 10000):
            conn.execute(T_SCORE.insert(), sc[lo:lo + 10000])
    build_s = time.perf_counter() - t
    real = real_cache(work)
    rd = store.register_cache(real, name="real-mlp2")
    explained_real = [int(i) for i in real.alive_latents()[:50]]
    with store.tx(write=True) as conn:
        for i in explained_real:
            store.insert_explanation(conn, {"dictionary_pk": rd["id"], "latent": i, "explain_key": ek,
                                            "explainer": "default", "model": "m", "prompt_version": "p", "seed": 0,
                                            "text": f"{words[i % len(words)]} tokens", "examples_used": [],
                                            "usage": {}, "cost_usd": 0.0})
    return {"synthetic": d, "real": rd, "explained": [int(i) for i in latents], "real_latents": explained_real,
            "build_s": build_s}


def real_cache(work: Path):
    from autointerp.cache import LatentCache

    path = work / "real-cache"
    if (path / "manifest.json").is_file():
        return LatentCache(path)
    from autointerp.extract import extract
    from autointerp.subject import load_subject

    subject = load_subject("builtin:smollm2", device="cpu")
    (c,) = extract(subject, "topk-neurons:8", "mlp_neurons.2", "builtin", path, n_tokens=8192, ctx_len=64,
                   batch_size=16, top_k=20, n_sample=20, pool_size=40, progress=False)
    return c


def start_server(url: str, workers: int, env_extra: dict | None = None) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "AUTOINTERP_DATABASE_URL": url, "AUTOINTERP_API_RUN_JOBS": "0", **(env_extra or {})}
    cmd = [sys.executable, "-m", "autointerp.cli", "serve", "--port", "0", "--no-run-jobs"]
    if workers > 1:
        cmd += ["--workers", str(workers)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    line = proc.stdout.readline()
    if not line.startswith("autointerp serving"):
        proc.kill()
        raise RuntimeError(f"server did not start: {line}{proc.stdout.read()[-2000:]}")
    base = line.split()[2]
    threading.Thread(target=proc.stdout.read, daemon=True).start()  # drain
    import urllib.request

    for _ in range(200):
        try:
            urllib.request.urlopen(base + "/api/v1/health", timeout=2).read()
            break
        except OSError:
            time.sleep(0.1)
    return proc, base


LOADGEN = r'''
import http.client, json, sys, threading, time, random
base, paths, seconds, conns, warm = sys.argv[1], json.loads(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), 2.0
host, port = base.split("//")[1].split(":")
lat, errors, stop = [], [0], [False]
lock = threading.Lock()
def worker(seed):
    rnd = random.Random(seed)
    c = http.client.HTTPConnection(host, int(port), timeout=30)
    mine = []
    t_end = time.perf_counter() + warm + seconds
    t_warm = time.perf_counter() + warm
    while True:
        now = time.perf_counter()
        if now > t_end: break
        p = paths[rnd.randrange(len(paths))]
        t = time.perf_counter()
        try:
            c.request("GET", p); r = c.getresponse(); r.read()
            ok = r.status == 200
        except Exception:
            ok = False; c.close(); c = http.client.HTTPConnection(host, int(port), timeout=30)
        dt = time.perf_counter() - t
        if t >= t_warm:
            if ok: mine.append(dt)
            else:
                with lock: errors[0] += 1
    with lock: lat.extend(mine)
ts = [threading.Thread(target=worker, args=(i,)) for i in range(conns)]
[t.start() for t in ts]; [t.join() for t in ts]
print(json.dumps({"n": len(lat), "errors": errors[0], "lat": lat}))
'''


WRK_LUA = r"""
local paths = {}
for line in io.lines(os.getenv("AUTOINTERP_BENCH_PATHS")) do paths[#paths + 1] = line end
math.randomseed(os.time())
request = function() return wrk.format("GET", paths[math.random(#paths)]) end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('{"n": %d, "us": %d, "errors": %d, "p50_us": %d, "p99_us": %d}\n', summary.requests,
    summary.duration, e.connect + e.read + e.write + e.status + e.timeout, latency:percentile(50),
    latency:percentile(99)))
end
"""


def loadgen(choice: str) -> str:
    if choice == "auto":
        return "wrk" if shutil.which("wrk") else "python"
    if choice == "wrk" and not shutil.which("wrk"):
        raise SystemExit("--loadgen wrk: wrk is not installed (apt-get install wrk)")
    return choice


def load(base: str, paths: list[str], seconds: float, connections: int, gen: str = "python") -> dict:
    if gen == "wrk":
        return load_wrk(base, paths, seconds, connections)
    out = subprocess.run([sys.executable, "-c", LOADGEN, base, json.dumps(paths), str(seconds), str(connections)],
                         capture_output=True, text=True, check=True)
    r = json.loads(out.stdout)
    lat = np.asarray(r["lat"]) * 1000
    return {"rps": r["n"] / seconds, "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
            "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None, "errors": r["errors"], "n": r["n"]}


def load_wrk(base: str, paths: list[str], seconds: float, connections: int) -> dict:
    """wrk with one thread (the client's own CPU use stays small); a separate 2 s run warms up first."""
    with tempfile.TemporaryDirectory() as tmp:
        script, plist = Path(tmp) / "paths.lua", Path(tmp) / "paths.txt"
        script.write_text(WRK_LUA)
        plist.write_text("\n".join(paths) + "\n")
        env = {**os.environ, "AUTOINTERP_BENCH_PATHS": str(plist)}
        r = {}
        for secs in (2, seconds):
            out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{int(round(secs))}s", "--timeout", "30s",
                                  "-s", str(script), base], capture_output=True, text=True, check=True, env=env)
            r = json.loads(out.stdout.strip().splitlines()[-1])
    return {"rps": r["n"] / (r["us"] / 1e6), "p50_ms": r["p50_us"] / 1000, "p99_ms": r["p99_us"] / 1000,
            "errors": r["errors"], "n": r["n"]}


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def run_backend(name: str, url: str, args, work: Path) -> list[dict]:
    info = build_store(url, args.latents, args.explained, work)
    print(f"[{name}] store: {args.latents} latents, {args.explained} explained, built in {info['build_s']:.1f} s",
          flush=True)
    rng = np.random.default_rng(1)
    syn = info["synthetic"]["id"]
    real = info["real"]["id"]
    hot = [f"/api/v1/dictionaries/{syn}/latents/{int(i)}" for i in rng.choice(info["explained"], 500)]
    every = [f"/api/v1/dictionaries/{syn}/latents/{int(i)}" for i in info["explained"]]
    scenarios = {
        "GET latent (100k store, stats + explanations + scores; 500 latents, response cache)": (hot, {}),
        "GET latent, response cache off (every explained latent; each request reads and serialises)":
            (every, {"AUTOINTERP_API_LATENT_CACHE_MB": "0"}),
        "GET latent with examples (real cache: 20 top + quantile contexts, decoded)":
            ([f"/api/v1/dictionaries/{real}/latents/{i}" for i in info["real_latents"]], {}),
        "GET dictionary (its score table and counts: aggregates over every explanation and score)":
            ([f"/api/v1/dictionaries/{syn}"], {}),
        "GET latents page (sort by detection score, 50 rows, keyset)":
            ([f"/api/v1/dictionaries/{syn}/latents?sort=score&scorer=detection&order=desc&limit=50"], {}),
        "GET latents page (sort by max activation, 50 rows, keyset)":
            ([f"/api/v1/dictionaries/{syn}/latents?sort=max_act&order=desc&limit=50"], {}),
        "search keyword (FTS over all explanations, k=20)":
            (["/api/v1/search?" + urllib.parse.urlencode({"q": w, "mode": "keyword"})
              for w in ("numbers", "French", "brackets code", "money", "legal text", "HTML")], {}),
    }
    # the same three with the store-wide read cache off (AUTOINTERP_API_READ_CACHE_MB=0): what each request costs
    # while the store is being written (any write empties that cache), or on PostgreSQL (never cached)
    off = {"AUTOINTERP_API_READ_CACHE_MB": "0"}
    for label in [k for k in scenarios if k.startswith(("GET latents page", "search keyword"))]:
        scenarios[label.replace(" (", ", read cache off (", 1)] = (scenarios[label][0], off)
    if args.only:
        scenarios = {k: v for k, v in scenarios.items() if any(o in k for o in args.only.split(","))}
    if args.semantic:
        scenarios["search semantic (MiniLM query + exact cosine, k=20)"] = ([
            "/api/v1/search?" + urllib.parse.urlencode({"q": w, "mode": "semantic"})
            for w in ("numbers in text", "French words", "source code")], {})
    gen = loadgen(args.loadgen)
    rows = []
    servers: dict[str, tuple] = {}
    try:
        for label, (paths, env_extra) in scenarios.items():
            cfg = json.dumps(env_extra, sort_keys=True)
            if cfg not in servers:
                for other in list(servers):  # one server at a time: the CPUs are the server's and the client's
                    _stop(servers.pop(other)[0])
                servers[cfg] = start_server(url, args.workers, env_extra)
            base = servers[cfg][1]
            if "semantic" in label:
                from autointerp.search import embed_explanations
                from autointerp.store import open_store

                t = time.perf_counter()
                n = embed_explanations(open_store(url))
                print(f"[{name}] embedded {n} explanations in {time.perf_counter() - t:.0f} s", flush=True)
            load(base, paths[:3], 2.0, 2)  # warm caches (tokenizer, embedder, SQLite pages)
            la = load_average()
            r = load(base, paths, args.seconds, args.connections, gen)
            r.update(backend=name, scenario=label, loadgen=gen, load_before=la, load_after=load_average())
            rows.append(r)
            print(f"[{name}] {label}: {r['rps']:.0f} req/s, p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, "
                  f"{r['errors']} errors ({gen}; load average {la} -> {r['load_after']})", flush=True)
    finally:
        for proc, _ in servers.values():
            _stop(proc)
    return rows


def _stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latents", type=int, default=100_000)
    ap.add_argument("--explained", type=int, default=20_000)
    ap.add_argument("--seconds", type=float, default=15)
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--backends", default="sqlite")
    ap.add_argument("--semantic", action="store_true", help="Also semantic search (embeds every explanation first)")
    ap.add_argument("--work", default=None, help="Folder for the store and the real cache (kept between runs)")
    ap.add_argument("--loadgen", choices=("auto", "wrk", "python"), default="auto",
                    help="Load generator: wrk when installed (auto), else the Python client")
    ap.add_argument("--only", default=None, help="Only scenarios whose label contains one of these (comma list)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    work = Path(args.work or tempfile.mkdtemp(prefix="api-load-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for b in args.backends.split(","):
        if b == "sqlite":
            db = work / f"store-{args.latents}-{time.time_ns()}.db"
            rows += run_backend("sqlite", f"sqlite:///{db}", args, work)
        elif b == "postgresql":
            import pgserver

            srv = pgserver.get_server(tempfile.mkdtemp(prefix="pg-api-load-"), cleanup_mode="stop")
            try:
                rows += run_backend("postgresql", srv.get_uri(), args, work)
            finally:
                srv.cleanup()
        else:
            raise SystemExit(f"unknown backend {b}")
    print()
    print("| backend | request | req/s | p50 ms | p99 ms | errors | load generator | load average (1/5/15 min) |")
    print("|---|---|---:|---:|---:|---:|---|---|")
    for r in rows:
        print(f"| {r['backend']} | {r['scenario']} | {r['rps']:.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
              f"{r['errors']} | {r['loadgen']} | {r['load_before']} |")


if __name__ == "__main__":
    main()
