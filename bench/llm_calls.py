"""LLM calls, prompt tokens and throughput of explain + detection + fuzzing, against the local test server.

    python bench/llm_calls.py [--latents 200] [--latency-ms 100] [--concurrency 32] [--calls-latents 10]

Part 1: per latent at 50 activating + 50 negative test examples (rule-based judge, no latency): calls and prompt
tokens of each stage, for the default batch size (20) and for batches of 10.
Part 2: wall time for N synthetic latents at the given server latency, with `concurrency` requests in flight at
most (the client's endpoint limit) and as many latents in progress. Default runtime ~30 s.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from llm_server_fixture import start_llm_server  # noqa: E402
from synthetic import bag_of_words_embed, make_world  # noqa: E402

from autointerp.explainers import ExplainConfig, Explanation, explain  # noqa: E402
from autointerp.llm import make_client  # noqa: E402
from autointerp.sampling import NegativePool  # noqa: E402
from autointerp.scorers import get_scorer  # noqa: E402


async def one_latent(rec, client, pool, batch_size):
    e = await explain(rec, client, kind="default", config=ExplainConfig(pool=pool), seed=0)
    if not isinstance(e, Explanation):
        return e, None, None
    det, fuz = get_scorer("detection"), get_scorer("fuzzing")
    d, f = await asyncio.gather(
        det.score(rec, e, client, config=det.Config(pool=pool, batch_size=batch_size), seed=0),
        fuz.score(rec, e, client, config=fuz.Config(pool=pool, batch_size=batch_size), seed=0),
    )
    return e, d, f


def calls_table(world, pool, n_latents: int) -> None:
    print(f"Part 1: per latent, explain + detection + fuzzing at 50+50 test examples ({n_latents} latents)")
    print(f"{'batch':>5} | {'explain':>15} | {'detection':>15} | {'fuzzing':>15} | {'total':>15} | "
          f"{'det bal.acc':>11} | {'fuzz bal.acc':>12}")
    print(f"{'':>5} | {'calls  p.tokens':>15} | {'calls  p.tokens':>15} | {'calls  p.tokens':>15} | "
          f"{'calls  p.tokens':>15} |")
    with start_llm_server(judge="judges:rule_judge") as srv:
        for bs in (20, 10):
            srv.reset_stats()
            recs = [world.record(i) for i in range(n_latents)]
            out = asyncio.run(_run_all(recs, srv, pool, bs, 32))
            server_calls = srv.stats()["requests"] / n_latents
            cols, total_c, total_t = [], 0.0, 0.0
            for k in range(3):
                c = sum(o[k].usage.calls for o in out) / n_latents
                t = sum(o[k].usage.prompt_tokens for o in out) / n_latents
                total_c, total_t = total_c + c, total_t + t
                cols.append(f"{c:5.1f} {t:9.0f}")
            assert abs(total_c - server_calls) < 1e-9, (total_c, server_calls)  # client usage == server count
            dba = sum(o[1].metrics["balanced_accuracy"] for o in out) / n_latents
            fba = sum(o[2].metrics["balanced_accuracy"] for o in out) / n_latents
            print(f"{bs:>5} | {' | '.join(cols)} | {total_c:5.1f} {total_t:9.0f} | {dba:11.3f} | {fba:12.3f}")
    print("(prompt tokens = the test server's estimate, ceil(chars/4))")


async def _run_all(recs, srv, pool, batch_size, concurrency):
    """All latents in one event loop, at most `concurrency` latents and requests in flight."""
    client = make_client("openai", model="judge", base_url=srv.base_url, api_key_env=None, cache_path=None,
                         concurrency=concurrency)
    sem = asyncio.Semaphore(concurrency)

    async def guarded(r):
        async with sem:
            return await one_latent(r, client, pool, batch_size)

    try:
        return await asyncio.gather(*(guarded(r) for r in recs))
    finally:
        await client.aclose()


def throughput(world, pool, n: int, latency_ms: float, concurrency: int) -> None:
    print(f"\nPart 2: {n} latents, server latency {latency_ms:g} ms, {concurrency} requests in flight at most")
    recs = [world.record(i) for i in range(n)]  # built before timing: the cache read is not under test
    with start_llm_server(judge="judges:rule_judge", latency_ms=latency_ms) as srv:
        t0 = time.perf_counter()
        out = asyncio.run(_run_all(recs, srv, pool, 20, concurrency))
        wall = time.perf_counter() - t0
        st = srv.stats()
    calls = st["requests"]
    ideal = calls * latency_ms / 1000 / concurrency
    ok = sum(o[1] is not None for o in out)
    print(f"{'latents':>8} {'calls':>6} {'calls/latent':>12} {'wall s':>7} {'latents/s':>9} {'calls/s':>8} "
          f"{'max in flight':>13} {'ideal s':>7}")
    print(f"{ok:>8} {calls:>6} {calls / n:>12.2f} {wall:>7.2f} {n / wall:>9.2f} {calls / wall:>8.1f} "
          f"{st['max_in_flight']:>13} {ideal:>7.2f}")
    print("(ideal = calls x latency / concurrency: the bound set by the server latency alone)")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--latents", type=int, default=200)
    ap.add_argument("--latency-ms", type=float, default=100)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--calls-latents", type=int, default=10)
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    world = make_world(n_latents=max(a.latents, a.calls_latents), n_act=120, n_pool=600, seed=0)
    # the pool is embedded once for the whole run (a hashed bag of words stands in for MiniLM here)
    pool = NegativePool.from_examples(world.examples(0, world.pool_ids), world.decode, bag_of_words_embed)
    calls_table(world, pool, a.calls_latents)
    throughput(world, pool, a.latents, a.latency_ms, a.concurrency)
    print(f"\ntotal bench time {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
