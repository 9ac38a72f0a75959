"""1M-latent JumpReLU extraction (issue 17): a SAELens JumpReLU checkpoint of 1,048,576 latents at SmolLM2's width
(d_in 576) through `autointerp extract` at its defaults (K 50, S 100, pool 1,000, ctx 64, batch 32, fp32 encode),
in a fresh process: its peak RSS (ru_maxrss of that process, from wait4), the cache's disk bytes per latent and the
wall time. Then the same extraction of a 64-latent checkpoint holding copies of 64 of its latents, and the
per-latent equality check: statistics (count, max, sum, histogram), top windows (tokens and activations) and the
negative pool's codes must be identical.

    python bench/million_latents.py --n-tokens 8192
    python bench/million_latents.py --n-tokens 8192 --job   # then the same extraction as a job (2 shards)

--n-tokens is small because the encode is the cost here (2,048 tokens × 1M latents × 576 is 2.4 TFLOP per batch,
~25 s on 2 CPU cores in fp32); the collector's memory does not grow with tokens (its slots are allocated up front)
and the plan bounds what more tokens could add.

The checkpoint is random but as sparse as a trained one: unit encoder directions, b_dec = the mean activation at
the hookpoint (apply_b_dec_to_input), b_enc = 0, and each latent's threshold z·σ, where σ is the standard deviation
of its pre-activation over calibration tokens and z the Gaussian quantile of a firing rate drawn log-uniformly in
[3e-6, 3e-4] (~70 latents per token if the activations were Gaussian; the measured mean is printed). The 64 latents
compared are the 48 that fired most in the big run and 16 drawn at random, spread over the whole index range (so
over many of the encode's latent chunks). A latent's reservoir sample is keyed by a hash of its index, so the
small dictionary draws other sample windows: only the sample sizes are compared.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

GiB = 2**30


def _cfg(n: int, d_in: int, hook_name: str) -> dict:
    return {"architecture": "jumprelu", "d_in": d_in, "d_sae": n, "dtype": "float32", "device": "cpu",
            "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
            "metadata": {"model_name": "smollm2", "hook_name": hook_name, "sae_lens_version": "6.5.1"}}


def _save(folder: Path, tensors: dict, hookpoint: str) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "sae_weights.safetensors"))
    d_in, n = tensors["W_enc"].shape
    (folder / "cfg.json").write_text(json.dumps(_cfg(n, d_in, hookpoint)))


def build(folder: Path, n: int, hookpoint: str, seed: int) -> None:
    """Write the calibrated random JumpReLU checkpoint (SAELens layout: W_enc [d_in, d_sae])."""
    import torch

    from autointerp.corpus import CorpusSpec, iter_windows
    from autointerp.subject import load_subject

    subject = load_subject("builtin:smollm2", device="cpu")
    hook = subject.hookpoint(hookpoint)
    acts = []
    for batch in iter_windows(CorpusSpec(source="builtin", ctx_len=64, n_tokens=16384, seed=seed + 1),
                              subject.tokenizer, 32):
        ids = torch.from_numpy(batch).long()
        x = subject.capture(ids, [hook])[hook.name].float()
        acts.append(x[~(subject.special_token_mask(ids) | subject.outlier_mask(x, 5.0))])
    x = torch.cat(acts)
    mu = x.mean(0)
    cov = torch.cov((x - mu).T)
    d = x.shape[1]
    g = torch.Generator().manual_seed(seed)
    W_enc, W_dec = torch.empty(d, n), torch.empty(n, d)
    threshold = torch.empty(n)
    step = 1 << 16
    for r in range(0, n, step):
        w = torch.randn(min(step, n - r), d, generator=g)
        w /= w.norm(dim=1, keepdim=True)
        sigma = ((w @ cov) * w).sum(1).clamp_min(1e-12).sqrt()
        rate = torch.exp(torch.empty(len(w)).uniform_(np.log(3e-6), np.log(3e-4), generator=g))
        threshold[r:r + len(w)] = torch.special.ndtri(1 - rate) * sigma
        W_enc[:, r:r + len(w)] = w.T
        W_dec[r:r + len(w)] = w
    _save(folder, {"W_enc": W_enc, "W_dec": W_dec, "b_enc": torch.zeros(n), "b_dec": mu,
                   "threshold": threshold}, hookpoint)
    sub = x[torch.randperm(len(x), generator=g)[:512]] - mu
    l0 = sum(((sub @ W_enc[:, r:r + step]) > threshold[r:r + step]).sum().item() for r in range(0, n, step))
    print(f"built {folder}: {n} latents; {l0 / len(sub):.1f} latents per token on {len(sub)} calibration tokens",
          flush=True)


def subset(big: Path, folder: Path, latents: np.ndarray, hookpoint: str) -> None:
    """A checkpoint holding exact copies of `latents` of the big one, in that order."""
    import torch
    from safetensors import safe_open

    idx = torch.from_numpy(latents)
    with safe_open(str(big / "sae_weights.safetensors"), framework="pt") as f:
        t = {name: f.get_tensor(name)[:, idx] if name == "W_enc" else f.get_tensor(name)[idx]
             for name in ("W_enc", "W_dec", "b_enc", "threshold")}
        t["b_dec"] = f.get_tensor("b_dec")
    _save(folder, t, hookpoint)


def run_cli(args, dictionary: Path, out: Path, log: Path) -> dict:
    """`autointerp extract` at its defaults in a fresh process; its own peak RSS from wait4."""
    cmd = [sys.executable, "-m", "autointerp.cli", "extract", "--dictionary", str(dictionary), "--hookpoint",
           args.hookpoint, "--n-tokens", str(args.n_tokens), "--out", str(out), "--overwrite"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "AUTOINTERP_DATABASE_URL": f"sqlite:///{args.work / 'store.db'}"}
    t = time.perf_counter()
    with open(log, "w") as fh:
        p = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(p.pid, 0)
    seconds = time.perf_counter() - t
    text = log.read_text()
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{text[-3000:]}")
    plan = next((ln for ln in text.replace("\r", "\n").splitlines() if ln.startswith("plan:")), "")
    return {"cmd": " ".join(cmd), "peak_rss": usage.ru_maxrss * 1024, "seconds": seconds, "plan": plan}


def planned(args, dictionary: Path, encode_dtype: str) -> str:
    """What `autointerp extract` plans for the dictionary at its defaults (100,000 tokens): the refusal line of a
    run given --max-memory 0.01, which stops before anything is collected or written."""
    cmd = [sys.executable, "-m", "autointerp.cli", "extract", "--dictionary", str(dictionary), "--hookpoint",
           args.hookpoint, "--encode-dtype", encode_dtype, "--max-memory", "0.01", "--out", str(args.work / "plan")]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return r.stderr.strip().splitlines()[-1]


def compare(big, small, latents: np.ndarray) -> dict:
    """Per latent: identical statistics, histogram, top windows and activations, sample sizes, pool codes."""
    bad = []
    for j, lat in enumerate(latents.tolist()):
        a, b = big.latent_stats(lat), small.latent_stats(j)
        same = (a.n_active == b.n_active and a.max_act == b.max_act and
                big.stats["act_sum"][lat] == small.stats["act_sum"][j] and np.array_equal(a.hist_counts, b.hist_counts))
        (ra, acts_a), (rb, acts_b) = big.kept("top", lat), small.kept("top", j)
        same &= np.array_equal(big.windows(ra), small.windows(rb)) and np.array_equal(acts_a, acts_b)
        same &= len(big.kept("sample", lat)[0]) == len(small.kept("sample", j)[0])
        if not same:
            bad.append(lat)
    pa, pb = big.pool(), small.pool()
    same_pool = np.array_equal(big.windows(pa["rows"]), small.windows(pb["rows"]))
    where = {lat: j for j, lat in enumerate(latents.tolist())}
    for w in range(len(pa["rows"])):
        la = np.asarray(pa["latents"][pa["indptr"][w]:pa["indptr"][w + 1]])
        ma = np.asarray(pa["max"][pa["indptr"][w]:pa["indptr"][w + 1]])
        keep = np.isin(la, latents)
        got_l = np.array([where[int(x)] for x in la[keep]], dtype=np.int64)
        order = np.argsort(got_l, kind="stable")
        lb = np.asarray(pb["latents"][pb["indptr"][w]:pb["indptr"][w + 1]])
        mb = np.asarray(pb["max"][pb["indptr"][w]:pb["indptr"][w + 1]])
        same_pool &= np.array_equal(got_l[order], lb) and np.array_equal(ma[keep][order], mb)
    fired = int(sum(big.latent_stats(int(lat)).n_active > 0 for lat in latents))
    return {"latents": len(latents), "fired": fired, "differ": bad, "pool_same": bool(same_pool),
            "top_windows": int(sum(len(small.kept("top", j)[0]) for j in range(len(latents))))}


def run_job(args, dictionary: Path, big) -> None:
    """The same extraction as a job (`autointerp run SPEC`, embedded, 2 shards) in a fresh process: its peak RSS,
    the store's bytes per latent for the examples, and per latent the same results as the CLI's cache `big`."""
    from sqlalchemy import func, select

    from autointerp.store import open_store
    from autointerp.store.examples import StoredCache
    from autointerp.store.tables import ExampleWindow, LatentExample

    url = f"sqlite:///{args.work / 'job-store.db'}"
    (args.work / "job-store.db").unlink(missing_ok=True)
    spec = {"extraction": {"model": "builtin:smollm2", "dictionary": str(dictionary), "hookpoint": args.hookpoint,
                           "n_tokens": args.n_tokens, "shards": 2},
            "explainer": "token_frequency", "scorers": [], "n_latents": 4, "hard_negatives": False}
    (args.work / "job.json").write_text(json.dumps(spec))
    cmd = [sys.executable, "-m", "autointerp.cli", "run", str(args.work / "job.json")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "AUTOINTERP_DATABASE_URL": url}
    t = time.perf_counter()
    with open(args.work / "job.log", "w") as fh:
        p = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(p.pid, 0)
    seconds = time.perf_counter() - t
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{(args.work / 'job.log').read_text()[-3000:]}")
    store = open_store(url)
    (d,) = store.dictionaries()
    with store.tx() as c:
        blob = c.execute(select(func.sum(func.length(LatentExample.__table__.c.data)))).scalar() or 0
        win = c.execute(select(func.sum(func.length(ExampleWindow.__table__.c.tokens)))).scalar() or 0
    stored = StoredCache(store, d)
    n_active = np.asarray(big.stats["n_active"])
    rng = np.random.default_rng(args.seed + 1)
    check = np.concatenate([np.argsort(-n_active, kind="stable")[:32],
                            rng.choice(np.flatnonzero(n_active), 32, replace=False)])
    bad = []
    for lat in check.tolist():
        a, b = big.latent_stats(lat), stored.latent_stats(lat)
        same = a.n_active == b.n_active and a.max_act == b.max_act and np.array_equal(a.hist_counts, b.hist_counts)
        for buf in ("top", "sample"):
            (ra, xa), (rb, xb) = big.kept(buf, lat), stored.kept(buf, lat)
            same &= np.array_equal(big.windows(ra), stored.windows(rb)) and np.array_equal(xa, xb)
        if not same:
            bad.append(lat)
    print(f"as a job ({' '.join(cmd)}, 2 shards, embedded): peak RSS {usage.ru_maxrss * 1024 / GiB:.2f} GiB, "
          f"{seconds:.0f} s; store {(blob + win) / args.n_latents:.0f} B per latent for examples (blobs "
          f"{blob / 1e6:.1f} MB, windows {win / 1e6:.1f} MB; {d['n_alive']} alive); {len(check)} latents vs the CLI "
          f"cache (stats, histograms, top and sample windows with activations): "
          f"{'identical' if not bad else 'DIFFER: ' + str(bad[:10])}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-tokens", type=int, default=8192)
    ap.add_argument("--n-latents", type=int, default=1 << 20)
    ap.add_argument("--hookpoint", default="resid_post.15")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=Path("/tmp/autointerp-bench-1m"),
                    help="checkpoints (~4.7 GB, kept for re-runs), caches and the store")
    ap.add_argument("--build", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--job", action="store_true", help="only the job run, against the CLI cache of an earlier run")
    args = ap.parse_args()
    big_ckpt = args.work / f"jumprelu-{args.n_latents}"
    if args.build:
        build(big_ckpt, args.n_latents, args.hookpoint, args.seed)
        return
    args.work.mkdir(parents=True, exist_ok=True)
    if not (big_ckpt / "cfg.json").is_file():  # in its own process: its memory is not the extraction's
        subprocess.run([sys.executable, __file__, "--build", "--work", str(args.work), "--n-latents",
                        str(args.n_latents), "--hookpoint", args.hookpoint, "--seed", str(args.seed)], check=True)
    from autointerp.cache import LatentCache

    if args.job:
        run_job(args, big_ckpt, LatentCache(args.work / "big"))
        return
    for dtype in ("float32", "bfloat16"):
        print(f"plan at the defaults (100,000 tokens), encode {dtype}: {planned(args, big_ckpt, dtype)}", flush=True)
    r = run_cli(args, big_ckpt, args.work / "big", args.work / "big.log")
    big = LatentCache(args.work / "big")
    disk = big.disk_bytes()
    print(f"command: {r['cmd']}\n{r['plan']}\n1M extraction: peak RSS {r['peak_rss'] / GiB:.2f} GiB, "
          f"{disk / args.n_latents:.0f} B per latent on disk ({disk / 1e6:.1f} MB), {r['seconds']:.0f} s wall "
          f"(model load included) for {big.n_tokens} tokens; {len(big.alive_latents())} latents fired, "
          f"{big.stats['n_active'].sum() / big.n_tokens:.1f} per token", flush=True)
    n_active = np.asarray(big.stats["n_active"])
    rng = np.random.default_rng(args.seed)
    most = np.argsort(-n_active, kind="stable")[:48]
    rest = rng.choice(np.setdiff1d(np.arange(args.n_latents), most), 16, replace=False)
    latents = np.sort(np.concatenate([most, rest])).astype(np.int64)
    small_ckpt = args.work / "jumprelu-64"
    subset(big_ckpt, small_ckpt, latents, args.hookpoint)
    rs = run_cli(args, small_ckpt, args.work / "small", args.work / "small.log")
    res = compare(big, LatentCache(args.work / "small"), latents)
    print(f"64-latent copy: peak RSS {rs['peak_rss'] / GiB:.2f} GiB, {rs['seconds']:.0f} s; latents "
          f"{latents.min()}..{latents.max()}, {res['fired']} fired, {res['top_windows']} top windows compared; "
          f"identical stats, histograms, top windows and activations, sample sizes: "
          f"{'yes' if not res['differ'] else 'NO: ' + str(res['differ'])}; pool codes identical: "
          f"{'yes' if res['pool_same'] else 'NO'}", flush=True)
    ok = r["peak_rss"] <= 12 * GiB and disk / args.n_latents <= 4096 and not res["differ"] and res["pool_same"]
    print(f"done-when (<= 12 GiB peak, <= 4 KB per latent, same per-latent results): {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
