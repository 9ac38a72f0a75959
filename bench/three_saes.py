"""Three small SAEs on real activations, compared by every method of autointerp.compare (issue 9).

Two TopK SAEs on one layer of SmolLM2-135M (seeds 0 and 1, the same activations) and one on a far layer, the demo's
width and k (autointerp.demo.DEMO), plus an untrained control on the near layer (its random init, 0 steps). Then one
extraction pass for all of them over the same tokens, 512 latents of each explained by the token-frequency baseline
through the job seam, the explanations embedded, and autointerp.compare.compare(store, A, B, method) for the
same-layer pair, the far pair and the control pair by

  decoder     Paulo & Belrose: decoder-cosine and encoder-cosine matchings; "shared" = both partners > 0.7
  embedding   cosine of the explanations' MiniLM embeddings, one-to-one, matched >= 0.7
  activation  Pearson correlation of window-level codes over the caches' shared pool windows, matched >= 0.7

and two references computed by the pure functions: each trained layer-15 SAE against its own untrained init
(directions), and the same-layer activation matching with one side's pool windows shuffled (chance correlation).

The far SAE's seed is 2 by default, not 0: train_topk_sae draws the decoder init from the seed alone, so a seed-0 SAE
on another layer starts from the very rows of near-s0, and the decoder method would count whatever of that init
both keep (a 20-step smoke run: decoder matched 100 %; at the default lr the rows keep a median cosine of 0.47 with
their init after 1000 steps). --far-seed 0 shows it.

  python bench/three_saes.py --lr 2e-3 --train-tokens 128000 --steps 3000    # docs/benchmarks.md: 526 s here
  python bench/three_saes.py --lr 2e-3                                        # the demo's 1000 steps, 64k tokens
  python bench/three_saes.py --probe-lr 5.66e-4 2e-3 5e-3 --probe-steps 1000 # how far each lr moves the rows

Everything goes under --out: the dictionaries, the extraction caches, a fresh SQLite store per run
(AUTOINTERP_DATABASE_URL) and AUTOINTERP_CACHE (the dequantized subject model), so the user's ~/.cache/autointerp
is not touched. Heavy: loads the subject model, two activation collections, three trainings, one extraction.
--probe-lr LR [LR ...] only trains near-s0 for --probe-steps at each learning rate and prints FVU, dead fraction
and how far the rows moved from their init (then exits), to pick --lr.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time
from pathlib import Path

LOADS: list[tuple[str, tuple[float, float, float]]] = []


def load_note(what: str) -> str:
    load = os.getloadavg()
    LOADS.append((what, load))
    return " ".join(f"{x:.2f}" for x in load)


def timed(label: str, fn):
    """fn's result and wall seconds; prints CPU seconds and the load average (a shared machine: wall time is an
    upper bound)."""
    t, cpu = time.perf_counter(), time.process_time()
    out = fn()
    dt, dcpu = time.perf_counter() - t, time.process_time() - cpu
    print(f"[{label}] {dt:.1f} s wall, {dcpu:.1f} s CPU, load average {load_note(label)}, peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB", flush=True)
    return out, dt


def init_decoder(n_latents: int, d: int, seed: int):
    """The untrained decoder rows of train_topk_sae's TopKSAE for `seed` (its first draw from the seeded
    generator); the encoder starts as the same rows scaled, so this is the init direction of both."""
    import torch

    dec = torch.randn(n_latents, d, generator=torch.Generator().manual_seed(seed))
    return dec / dec.norm(dim=1, keepdim=True)


def moved(model, seed: int) -> dict:
    """Median cosine of each decoder / encoder row with its own init row (1 = never moved)."""
    import torch

    w_dec = model.W_dec.detach().float()
    w_enc = model.encoder.weight.detach().float()
    init = init_decoder(w_dec.shape[0], w_dec.shape[1], seed)
    unit = lambda x: x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)  # noqa: E731
    return {"dec_init_cos_median": float(torch.median((unit(w_dec) * init).sum(1))),
            "enc_init_cos_median": float(torch.median((unit(w_enc) * init).sum(1)))}


def median_partner(pairs, n_a: int) -> float:
    """Median over all n_a A latents of their partner's similarity (0 for a latent left without a partner)."""
    import numpy as np

    sims = np.zeros(n_a)
    if pairs:
        sims[: len(pairs)] = [p[2] for p in pairs]
    return float(np.median(sims))


def main() -> None:
    from autointerp.demo import DEMO, DEMO_HOOKPOINT

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/three-saes"), help="work folder (default %(default)s)")
    p.add_argument("--near", default=DEMO_HOOKPOINT, help="the two seeds' hookpoint (default %(default)s)")
    p.add_argument("--far", default="resid_post.3", help="the far SAE's hookpoint (default %(default)s)")
    p.add_argument("--far-seed", type=int, default=2, help="the far SAE's seed (default %(default)s; 0 shares "
                   "near-s0's init)")
    p.add_argument("--no-control", action="store_true", help="skip the untrained control SAE (seed 3, 0 steps)")
    p.add_argument("--n-latents", type=int, default=DEMO["n_latents"])
    p.add_argument("--k", type=int, default=DEMO["k"])
    p.add_argument("--train-tokens", type=int, default=DEMO["n_tokens"],
                   help="activations collected per hookpoint for training (corpus seed 1234, as the demo's)")
    p.add_argument("--steps", type=int, default=DEMO["steps"], help="training steps per SAE (default: the demo's)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (default: train_topk_sae's "
                   "width-scaled 2e-4/sqrt(n/2^14) = 5.7e-4 at 2048 latents)")
    p.add_argument("--threads", type=int, default=None, help="torch threads while training (default: torch's)")
    p.add_argument("--extract-tokens", type=int, default=60_000, help="tokens of the one extraction pass "
                   "(corpus seed 0, so not the training windows; default %(default)s, the demo's)")
    p.add_argument("--explain", type=int, default=512, help="latents explained per dictionary (token frequency)")
    p.add_argument("--probe-lr", type=float, nargs="+", default=None,
                   help="only train seed 0 on --near for --probe-steps at each of these learning rates; print "
                        "FVU, dead fraction and how far the rows moved from init; then exit")
    p.add_argument("--probe-steps", type=int, default=500)
    args = p.parse_args()

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    os.environ["AUTOINTERP_CACHE"] = str(out / "cache")
    os.environ["AUTOINTERP_DATABASE_URL"] = f"sqlite:///{out / f'store-{stamp}.db'}"
    for var, val in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(var, val)

    import torch

    from autointerp.activations import collect_activations
    from autointerp.compare import compare, compare_activations, compare_directions
    from autointerp.corpus import CorpusSpec
    from autointerp.subject import load_subject
    from autointerp.train_sae import train_topk_sae

    t_start = time.perf_counter()
    print(f"start {time.strftime('%H:%M:%S', time.gmtime())} UTC, load average {load_note('start')}, "
          f"torch threads {torch.get_num_threads()}, store {os.environ['AUTOINTERP_DATABASE_URL']}", flush=True)
    subject, _ = timed("subject model builtin:smollm2", lambda: load_subject("builtin:smollm2"))
    spec = CorpusSpec(source="builtin", ctx_len=64, n_tokens=args.train_tokens, seed=1234)
    lr_used = args.lr if args.lr is not None else 2e-4 / math.sqrt(args.n_latents / 2**14)

    def train(name: str, acts, hookpoint: str, seed: int, steps: int, lr: float) -> dict:
        r, dt = timed(f"train {name} ({hookpoint}, seed {seed}, {steps} steps, lr {lr:.2g})", lambda: train_topk_sae(
            acts, args.n_latents, args.k, out_dir=out / "saes" / name, hookpoint=hookpoint, seed=seed, steps=steps,
            lr=lr, batch_size=args.batch_size, num_threads=args.threads, progress=False))
        info = {"name": name, "hookpoint": hookpoint, "seed": seed, "steps": steps, "lr": lr, "fvu": r.fvu,
                "dead_fraction": r.dead_fraction, **moved(r.model, seed), "train_s": round(dt, 1), "path": str(r.path),
                "model": r.model}
        print(f"  {name}: FVU {r.fvu:.3f}, dead {r.dead_fraction:.3f}, median cosine with init: decoder "
              f"{info['dec_init_cos_median']:.3f}, encoder {info['enc_init_cos_median']:.3f}", flush=True)
        return info

    if args.probe_lr:
        acts, _ = timed(f"activations {args.near} ({args.train_tokens} tokens)",
                        lambda: collect_activations(subject, args.near, spec, progress=False))
        print(f"  {tuple(acts.shape)} activations")
        for lr in args.probe_lr:
            train(f"probe-lr{lr:g}", acts, args.near, 0, args.probe_steps, lr)
        return

    # 1. activations once per hookpoint, three SAEs
    saes = []
    far = f"far-s{args.far_seed}"
    near_members = [("near-s0", 0, args.steps), ("near-s1", 1, args.steps)]
    if not args.no_control:
        near_members.append(("near-untrained", 3, 0))
    for hookpoint, members in ((args.near, near_members), (args.far, [(far, args.far_seed, args.steps)])):
        acts, _ = timed(f"activations {hookpoint} ({args.train_tokens} tokens)",
                        lambda: collect_activations(subject, hookpoint, spec, progress=False))
        print(f"  {tuple(acts.shape)} activations (special tokens and outliers dropped)", flush=True)
        for name, seed, steps in members:
            saes.append(train(name, acts, hookpoint, seed, steps, lr_used))
        del acts

    # 2. one extraction pass for all three over the same tokens
    from autointerp.extract import extract

    caches, _ = timed(f"extract {len(saes)} SAEs, {args.extract_tokens} tokens, one pass", lambda: extract(
        subject, [s["path"] for s in saes], [s["hookpoint"] for s in saes], "builtin", out / "extract",
        n_tokens=args.extract_tokens, ctx_len=64, overwrite=True, progress=False))
    del subject

    # 3. store, token-frequency explanations through the job seam, embeddings
    from autointerp.jobs import run, submit
    from autointerp.search import embed_explanations
    from autointerp.store import open_store

    store = open_store()
    names = {s["name"]: f"{s['name']}-{s['hookpoint']}" for s in saes}
    for s, c in zip(saes, caches):
        d = store.register_cache(c, name=names[s["name"]])
        s["alive"], s["cache"] = int(d["n_alive"]), str(c.path)

    def explain_all():
        for c in caches:
            j = submit(store, {"dictionary": str(c.path), "n_latents": args.explain, "explainer": "token_frequency",
                               "scorers": [], "hard_negatives": False})
            run(store, j, progress=False)
    timed(f"explain {args.explain} latents x {len(caches)} (token_frequency, job seam)", explain_all)
    n_emb, _ = timed("embed explanations (MiniLM)", lambda: embed_explanations(store))
    print(f"  {n_emb} explanations embedded", flush=True)

    # 4. the comparisons
    pairs = {"same layer (seeds 0, 1)": ("near-s0", "near-s1"),
             f"far layer ({args.near} vs {args.far}, seeds 0, {args.far_seed})": ("near-s0", far)}
    if not args.no_control:
        pairs["control: near-s0 vs untrained (seed 3)"] = ("near-s0", "near-untrained")
    rows = []
    for label, (a, b) in pairs.items():
        for method in ("decoder", "embedding", "activation"):
            r, dt = timed(f"compare {label} by {method}",
                          lambda: compare(store, names[a], names[b], method))
            s, res = r["summary"], r["result"]
            if method == "decoder":
                headline = s["shared_fraction"]
                med = median_partner(res["decoder"]["pairs"], res["decoder"]["n_a"])
                extra = f"decoder matched {s['decoder']['matched_fraction_a']:.3f}"
                if s["encoder"] is None:
                    extra += "; no encoder weights: shared = decoder only"
                else:
                    med_enc = median_partner(res["encoder"]["pairs"], res["encoder"]["n_a"])
                    extra += (f", encoder matched {s['encoder']['matched_fraction_a']:.3f} (median partner "
                              f"{med_enc:.3f}), same partner {s['same_partner_fraction']:.2f}")
            else:
                headline = s["matched_fraction_a"]
                med = median_partner(res["pairs"], res["n_a"])
                extra = (f"explained {s['explained_a']}/{s['explained_b']}" if method == "embedding"
                         else f"{s['pool_windows']} pool windows")
            rows.append({"pair": label, "method": method, "headline": headline, "median_partner": med,
                         "mean_similarity": s.get("mean_similarity", s.get("decoder", {}).get("mean_similarity")),
                         "seconds": round(dt, 2), "extra": extra})

    # references, from the pure functions: a trained SAE vs its own init; shuffled windows
    import numpy as np

    from autointerp.compare import _pool_codes

    refs = []
    for s in saes[:2]:
        init = init_decoder(args.n_latents, s["model"].W_dec.shape[1], s["seed"]).numpy()
        dec = s["model"].W_dec.detach().float().numpy()
        enc = s["model"].encoder.weight.detach().float().numpy()
        r = compare_directions(dec, init, enc, init)
        refs.append((f"{s['name']} vs its own init, directions", r.shared_fraction,
                     float(np.median(r.decoder.partner_similarity()))))
    da, db = store.dictionary(names["near-s0"]), store.dictionary(names["near-s1"])
    _, ca = _pool_codes(store, da)
    _, cb = _pool_codes(store, db)
    perm = np.random.default_rng(0).permutation(cb.shape[0])
    m = compare_activations(ca, cb[perm])
    refs.append(("near-s0 vs near-s1, activation, B's pool windows shuffled", m.summary["matched_fraction_a"],
                 float(np.median(m.partner_similarity()))))

    total = time.perf_counter() - t_start
    print(f"\nSAEs: {args.n_latents} latents, TopK {args.k}, {args.steps} steps x {args.batch_size} tokens, lr "
          f"{lr_used:.3g}, on {args.train_tokens} tokens per hookpoint; extraction {args.extract_tokens} tokens")
    print("| SAE | hookpoint | seed | steps | FVU (train) | dead | alive in extraction | "
          "median cos(decoder row, init) | median cos(encoder row, init) | train s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for s in saes:
        print(f"| {s['name']} | {s['hookpoint']} | {s['seed']} | {s['steps']} | {s['fvu']:.3f} | "
              f"{s['dead_fraction']:.3f} | {s['alive']} | {s['dec_init_cos_median']:.3f} | "
              f"{s['enc_init_cos_median']:.3f} | {s['train_s']} |")
    print("\n| pair | method | shared / matched ≥ 0.7 (of A) | median partner similarity | wall s | notes |")
    print("|---|---|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['pair']} | {r['method']} | {r['headline']:.3f} | {r['median_partner']:.3f} | {r['seconds']} | "
              f"{r['extra']} |")
    print("\n| reference | shared / matched ≥ 0.7 | median partner similarity |")
    print("|---|---:|---:|")
    for label, frac, med in refs:
        print(f"| {label} | {frac:.3f} | {med:.3f} |")
    loads = [x[1][0] for x in LOADS]
    print(f"\ntotal {total:.0f} s wall; 1-min load average over the phases {min(loads):.2f}–{max(loads):.2f}; "
          f"end {time.strftime('%H:%M:%S', time.gmtime())} UTC")
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "lr": lr_used, "total_s": round(total, 1),
              "saes": [{k: v for k, v in s.items() if k != "model"} for s in saes], "comparisons": rows,
              "references": refs, "loads": LOADS}
    (out / f"result-{stamp}.json").write_text(json.dumps(result, indent=1))
    print(f"written {out / f'result-{stamp}.json'}")


if __name__ == "__main__":
    sys.exit(main())
