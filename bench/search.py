"""Semantic search benchmark: the embedded vector index (autointerp.vector_index) over 100k and 1M real-text
MiniLM embeddings — p50/p99 per query, recall@10 against exact search, build time, memory.

Texts: sentences of the docstrings of every .py file in the stdlib and the venv's site-packages (parsed with ast,
never imported), 20–160 characters, deduplicated, shuffled with a fixed seed — short, varied English like
explanations. Embedding on this 2-core machine is ~40–60 texts/s, so `embed` runs resumably in the background
(chunks of 4,096 under the cache folder) and `run` uses the chunks present; sets larger than the real vectors are
real vectors plus Gaussian noise (sigma per coordinate, re-normalised), said in the output.

  python bench/search.py embed --n 100000            # background; resumable
  python bench/search.py run --sizes 100000 1000000  # the benchmark
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import resource
import sysconfig
import time
from pathlib import Path

import numpy as np

CHUNK = 4096


def cache_dir() -> Path:
    root = Path(os.environ.get("AUTOINTERP_CACHE", Path.home() / ".cache" / "autointerp"))
    path = root / "bench-search"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _docstring_sentences(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            for s in re.split(r"(?<=[.!?])\s+|\n\s*\n", ast.get_docstring(node) or ""):
                s = " ".join(s.split())
                if 20 <= len(s) <= 160 and re.search(r"[A-Za-z]{3}", s):
                    out.append(s)
    return out


def texts() -> list[str]:
    """The real texts, gathered once (a few minutes) and kept as one file."""
    path = cache_dir() / "texts.json"
    if path.exists():
        return json.loads(path.read_text())
    seen: set[str] = set()
    for root in (sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"]):
        for py in sorted(Path(root).rglob("*.py")):
            seen.update(_docstring_sentences(py))
    out = sorted(seen)
    np.random.default_rng(0).shuffle(out)
    path.write_text(json.dumps(out))
    return out


def embed_chunks(n: int) -> None:
    from autointerp.embedder import embed

    all_texts = texts()
    print(f"{len(all_texts)} texts; embedding the first {n} in chunks of {CHUNK}", flush=True)
    for lo in range(0, min(n, len(all_texts)), CHUNK):
        out = cache_dir() / f"emb-{lo:08d}.npy"
        if out.exists():
            continue
        t = time.perf_counter()
        vecs = embed(all_texts[lo:lo + CHUNK], batch_size=128)
        np.save(out.with_suffix(".tmp.npy"), vecs)
        os.replace(out.with_suffix(".tmp.npy"), out)
        print(f"chunk {lo}: {len(vecs) / (time.perf_counter() - t):.1f} texts/s", flush=True)


def real_vectors() -> np.ndarray:
    chunks = sorted(cache_dir().glob("emb-*[0-9].npy"))
    if not chunks:
        raise SystemExit("no embeddings yet: run `python bench/search.py embed` first")
    return np.concatenate([np.load(c) for c in chunks])


def query_vectors(n_real: int, n: int = 200) -> np.ndarray:
    """Real embeddings of texts not in the indexed set (the next n after the embedded ones)."""
    from autointerp.embedder import embed

    path = cache_dir() / f"queries-{n_real}-{n}.npy"
    if not path.exists():
        np.save(path, embed(texts()[n_real:n_real + n]))
    return np.load(path)


def dataset(real: np.ndarray, n: int, sigma: float) -> np.ndarray:
    """n unit vectors: the real ones first, then real[i % len(real)] + N(0, sigma^2) per coordinate, re-normalised."""
    from autointerp.vector_index import unit_rows

    if n <= len(real):
        return real[:n].copy()
    rng = np.random.default_rng(1)
    out = np.empty((n, real.shape[1]), np.float32)
    out[:len(real)] = real
    for lo in range(len(real), n, 65536):
        hi = min(lo + 65536, n)
        base = real[np.arange(lo, hi) % len(real)]
        out[lo:hi] = unit_rows(base + rng.normal(0, sigma, base.shape).astype(np.float32))
    return out


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def load_average() -> str:
    """The 1/5/15-minute load average, printed beside every figure (the machine is shared)."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def bench_size(x: np.ndarray, queries: np.ndarray, dtype: str, efs: list[int], expansion_add: int,
               connectivity: int = 16) -> list[dict]:
    from autointerp.vector_index import HnswParams, VectorIndex, exact_topk

    ids = np.arange(len(x), dtype=np.int64)
    t = time.perf_counter()
    truth, truth_sims = exact_topk(queries, x, 10)
    exact_ms = (time.perf_counter() - t) / len(queries) * 1e3  # per query, amortised over one batch of 200
    before = rss_mb()
    t = time.perf_counter()
    cpu = time.process_time()
    index = VectorIndex.build(ids, x, params=HnswParams(dtype=dtype, expansion_add=expansion_add,
                                                        connectivity=connectivity))
    build_s, build_cpu_s = time.perf_counter() - t, time.process_time() - cpu
    build_load = load_average()
    index_mb = rss_mb() - before
    path = cache_dir() / "bench.usearch"
    t = time.perf_counter()
    index.save(path)
    save_s = time.perf_counter() - t
    t = time.perf_counter()
    VectorIndex.load(path)
    load_s = time.perf_counter() - t
    rows = []
    for ef in efs:
        index._graph.expansion_search = ef
        lat, got = [], []
        for q in queries:
            t = time.perf_counter()
            got.append(index.search(q, 10).ids)
            lat.append((time.perf_counter() - t) * 1e3)
        recall = np.mean([len(set(g) & set(e)) / 10 for g, e in zip(got, truth)])
        # near-ties: a returned vector within 0.01 cosine of the exact 10th best is as good a result to a reader
        got_sims = np.stack([x[g] @ q for g, q in zip(got, queries)])
        recall_tie = np.mean(got_sims >= truth_sims[:, -1:] - 0.01)
        allowed = ids[::10]  # a filter keeping 10 % of the set (over-fetch path)
        flat = []
        for q in queries[:50]:
            t = time.perf_counter()
            index.search(q, 10, allowed=allowed)
            flat.append((time.perf_counter() - t) * 1e3)
        rows.append({"n": len(x), "dtype": dtype, "connectivity": connectivity, "expansion_add": expansion_add,
                     "ef": ef, "build_s": round(build_s, 1), "build_cpu_s": round(build_cpu_s, 1),
                     "build_load": build_load,
                     "index_rss_mb": round(index_mb), "file_mb": round(path.stat().st_size / 2**20),
                     "save_s": round(save_s, 1), "load_s": round(load_s, 1),
                     "p50_ms": round(float(np.percentile(lat, 50)), 2), "p99_ms": round(float(np.percentile(lat, 99)), 2),
                     "recall10": round(float(recall), 4),
                     "recall10_within_0.01": round(float(recall_tie), 4), "filtered10pct_p50_ms": round(float(np.median(flat)), 2),
                     "exact_numpy_batched_ms_per_query": round(exact_ms, 1), "load": load_average()})
        print(json.dumps(rows[-1]), flush=True)
    path.unlink()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("embed")
    e.add_argument("--n", type=int, default=100_000)
    r = sub.add_parser("run")
    r.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    r.add_argument("--sigma", type=float, default=0.025)
    r.add_argument("--dtype", nargs="+", default=["f16"])
    r.add_argument("--ef", type=int, nargs="+", default=[64, 128])
    r.add_argument("--expansion-add", type=int, default=128)
    r.add_argument("--connectivity", type=int, nargs="+", default=[16])
    r.add_argument("--real", type=int, default=0,
                   help="use only the first N real vectors as sources: n / N near-copies each (e.g. --sizes 200000 "
                        "--real 5734 has the 1M set's ~35 copies per source at a fifth of the build)")
    args = p.parse_args()
    if args.cmd == "embed":
        embed_chunks(args.n)
        return
    real = real_vectors()
    queries = query_vectors(len(real))  # held out from all real vectors, whatever --real keeps
    real = real[:args.real] if args.real else real
    print(f"{len(real)} real MiniLM embeddings, {len(queries)} real held-out queries; sets beyond {len(real)}: real "
          f"vector i % {len(real)} + N(0, {args.sigma}^2) per coordinate, re-normalised", flush=True)
    for n in args.sizes:
        x = dataset(real, n, args.sigma)
        for dtype in args.dtype:
            for m in args.connectivity:
                bench_size(x, queries, dtype, args.ef, args.expansion_add, m)
        del x
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB", flush=True)


if __name__ == "__main__":
    main()
