"""Reproduction (issue 20, part 7b): delphi's claim "SAEs on nearby layers are similar", at this machine's scale.

TopK SAEs of the demo's recipe (autointerp.demo.DEMO: 2048 latents, k 32, 1000 steps of 256 tokens, lr 2e-3, on
64k tokens of the built-in corpus, corpus seed 1234) at resid_post of several SmolLM2-135M layers (default 14, 15 and
a far one, 3). The layer-15 SAE is the demo's own (ensure_demo_dictionary, seed 0); every other one is trained
here on activations collected in one forward pass for all layers (the same windows and the same special-token and
massive-norm filtering as autointerp.activations.collect_activations), each with its own seed, so no two share a
decoder init (train_topk_sae draws the init from the seed alone; see bench/three_saes.py). A second SAE on the
demo's layer (seed 1, the same activations, as the demo's own second SAE; --same-layer-seed) gives the same-layer
reference (off by default: one more training; bench/three_saes.py measured it).

All SAEs are extracted in one pass over the same tokens (autointerp.extract.extract, corpus seed 0), a random sample
of alive latents of each is explained by the token_frequency baseline through the job seam (autointerp.jobs.submit +
run on a fresh SQLite store under --out), and each pair is compared by autointerp.compare.compare(store, A, B,
method):

  embedding  one-to-one matching of the explanations' MiniLM embeddings: mean partner similarity over A's explained
             latents (0 for a latent left without a partner; pairs < 0.4 are no candidates) and the fraction matched
             at >= 0.7; beside it the mean cosine of A's explanations with B's over random pairs (no matching), the
             level token-frequency lists share anyway
  decoder    Paulo & Belrose's decoder-cosine matching over all 2048 latents (same d_in, resid_post): mean partner
             cosine, fraction matched > 0.7, and "shared" (decoder and encoder partners both > 0.7)

Intervals: percentile bootstrap 95 % over A's latents (their partner similarities resampled; the matching itself is
not redone). ITDA Jaccard across these layers is bench/itda_layers.py (docs/benchmarks.md, "ITDA layer similarity").

  nice -n 5 python bench/repro_layers.py --layers 14,15,3 --n-explain 400      # docs/benchmarks.md

AUTOINTERP_CACHE is left as it is (the demo SAE and the dequantized model are reused from there) unless --cache.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from repro_common import bootstrap_mean, finish, load_note, timed  # noqa: E402


def partner_sims(pairs, latents_a):
    """Per A latent (in `latents_a`), its partner's similarity from a stored matching's pairs, 0 without one."""
    import numpy as np

    got = {int(a): float(s) for a, _, s in pairs}
    return np.array([got.get(int(i), 0.0) for i in latents_a])


def collect_layers(subject, hookpoints: list[str], spec, batch_size: int = 32, max_norm_ratio: float = 5.0):
    """{hookpoint: [N_h, d] activations}: collect_activations for several hookpoints in one forward pass per batch
    (the same windows, the same special-token and massive-norm filtering per hookpoint)."""
    import torch

    from autointerp.corpus import iter_windows

    hooks = [subject.hookpoint(h) for h in hookpoints]
    chunks: dict[str, list] = {h: [] for h in hookpoints}
    for batch in iter_windows(spec, subject.tokenizer, batch_size):
        ids = torch.from_numpy(batch).long()
        got = subject.capture(ids, hooks)
        special = subject.special_token_mask(ids)
        for h, hook in zip(hookpoints, hooks):
            x = got[hook.name]
            keep = ~(special.to(x.device) | subject.outlier_mask(x, max_norm_ratio))
            chunks[h].append(x[keep].float().cpu())
    return {h: torch.cat(c) for h, c in chunks.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("/tmp/repro-layers"),
                   help="work folder: SAEs, extraction caches, the SQLite store, result JSON (default %(default)s)")
    p.add_argument("--cache", type=Path, default=None, help="AUTOINTERP_CACHE for this run (default: as set)")
    p.add_argument("--layers", default="14,15,3", help="resid_post layers (default %(default)s)")
    p.add_argument("--same-layer-seed", action="store_true",
                   help="also train a second SAE on the demo's layer (seed 1), the same-layer reference")
    p.add_argument("--extract-tokens", type=int, default=40_000, help="tokens of the extraction pass (corpus seed 0)")
    p.add_argument("--n-explain", type=int, default=400, help="alive latents explained per SAE")
    p.add_argument("--bootstrap", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0, help="latent sample and bootstrap seed")
    p.add_argument("--threads", type=int, default=None, help="torch threads while training (default: torch's; 1 "
                   "is much faster on busy shared cores)")
    p.add_argument("--progress", action="store_true", help="progress bars (stderr) for the extraction")
    args = p.parse_args()
    layers = [int(x) for x in args.layers.split(",")]

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    if args.cache is not None:
        os.environ["AUTOINTERP_CACHE"] = str(args.cache.resolve())
    os.environ["AUTOINTERP_DATABASE_URL"] = f"sqlite:///{out / f'store-{stamp}.db'}"
    for var, val in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(var, val)

    import numpy as np
    import torch

    from autointerp.compare import _explanation_vectors, compare
    from autointerp.corpus import CorpusSpec
    from autointerp.demo import DEMO, DEMO_HOOKPOINT, demo_dictionary_path, ensure_demo_dictionary
    from autointerp.extract import extract
    from autointerp.jobs import run, submit
    from autointerp.jobs.runner import select_latents
    from autointerp.jobs.spec import parse_job_spec
    from autointerp.store import open_store
    from autointerp.subject import load_subject
    from autointerp.train_sae import train_topk_sae

    t_start = time.perf_counter()
    print(f"start {time.strftime('%H:%M:%S', time.gmtime())} UTC, load average {load_note()}, torch threads "
          f"{torch.get_num_threads()}, store {os.environ['AUTOINTERP_DATABASE_URL']}", flush=True)
    subject = timed("subject model builtin:smollm2", lambda: load_subject("builtin:smollm2"))

    # 1. the SAEs: the demo's where it has one (layer 15, seeds 0 [and 1]); the rest trained here, one seed each
    saes: list[dict] = []  # name, layer, hookpoint, seed, path
    demo_layer = int(DEMO_HOOKPOINT.split(".")[1])
    if demo_layer in layers:
        timed("demo SAE (ensure_demo_dictionary)", lambda: ensure_demo_dictionary(subject, progress=False))
        saes.append({"name": f"L{demo_layer}", "layer": demo_layer, "hookpoint": DEMO_HOOKPOINT, "seed": 0,
                     "path": str(demo_dictionary_path(0) / DEMO_HOOKPOINT), "trained": "demo"})
    # (layer, seed) trained here: the demo layer's second seed (1, as the demo's own second SAE), then one seed each
    todo = [(demo_layer, 1)] if demo_layer in layers and args.same_layer_seed else []
    todo += [(la, 2 + i) for i, la in enumerate(x for x in layers if x != demo_layer)]
    if todo:
        spec = CorpusSpec(source="builtin", ctx_len=64, n_tokens=DEMO["n_tokens"], seed=1234)
        hps = sorted({f"resid_post.{la}" for la, _ in todo})
        acts = timed(f"activations {', '.join(hps)} ({DEMO['n_tokens']} tokens, one pass)",
                     lambda: collect_layers(subject, hps, spec))
        for la, sd in todo:
            hp, name = f"resid_post.{la}", f"L{la}" + ("-s1" if la == demo_layer else "")
            r = timed(f"train {name} ({hp}, seed {sd}, {DEMO['steps']} steps, lr {DEMO['lr']})", lambda: train_topk_sae(
                acts[hp], n_latents=DEMO["n_latents"], k=DEMO["k"], out_dir=out / f"saes-{stamp}" / name,
                hookpoint=hp, seed=sd, steps=DEMO["steps"], lr=DEMO["lr"],
                num_threads=args.threads, progress=False))
            print(f"  {name}: {tuple(acts[hp].shape)} activations, FVU {r.fvu:.3f}, dead {r.dead_fraction:.3f}",
                  flush=True)
            saes.append({"name": name, "layer": la, "hookpoint": hp, "seed": sd, "path": str(r.path),
                         "trained": "here", "fvu": r.fvu, "dead": r.dead_fraction})
        del acts

    # 2. one extraction pass, 3. token-frequency explanations through the job seam
    caches = timed(f"extract {len(saes)} SAEs, {args.extract_tokens} tokens, one pass", lambda: extract(
        subject, [s["path"] for s in saes], [s["hookpoint"] for s in saes], "builtin", out / f"extract-{stamp}",
        n_tokens=args.extract_tokens, ctx_len=64, overwrite=True, progress=args.progress))
    del subject
    store = open_store()
    rng = np.random.default_rng(args.seed)
    for s, c in zip(saes, caches):
        d = store.register_cache(c, name=s["name"])
        alive = select_latents(store, d, parse_job_spec({"dictionary": str(c.path), "latents": "all"}))
        pick = sorted(int(i) for i in rng.choice(alive, size=min(args.n_explain, len(alive)), replace=False))
        job = submit(store, {"dictionary": str(c.path), "latents": pick, "explainer": "token_frequency",
                             "scorers": [], "hard_negatives": False, "seed": args.seed})
        summ = timed(f"{s['name']}: explain {len(pick)} latents (job {job})", lambda: run(store, job, progress=False))
        s.update(alive=len(alive), sampled=len(pick), skipped=int(summ.latents_skipped))

    # 4. every pair: embedding and decoder
    brng = np.random.default_rng(args.seed + 1)
    vecs = {s["name"]: _explanation_vectors(store, store.dictionary(s["name"]), None) for s in saes}
    rows = []
    for sa, sb in itertools.combinations(saes, 2):
        if sa["layer"] > sb["layer"] or (sa["layer"] == sb["layer"] and sa["seed"] > sb["seed"]):
            sa, sb = sb, sa
        a, b = sa["name"], sb["name"]
        emb = timed(f"compare {a} {b} embedding", lambda: compare(store, a, b, method="embedding"))
        la = vecs[a][0]
        e_part = partner_sims(emb["result"]["pairs"], la)
        va, vb = vecs[a][1], vecs[b][1]
        ia, ib = brng.integers(0, len(va), 20_000), brng.integers(0, len(vb), 20_000)
        random_cos = float(np.mean(np.sum(va[ia] * vb[ib], 1)))
        dec = timed(f"compare {a} {b} decoder", lambda: compare(store, a, b, method="decoder"))
        dres = dec["result"]["decoder"]
        d_part = partner_sims(dres["pairs"], np.arange(dres["n_a"]))
        rows.append({
            "a": a, "b": b, "apart": abs(sb["layer"] - sa["layer"]), "same_layer": sa["layer"] == sb["layer"],
            "explained": [emb["summary"]["explained_a"], emb["summary"]["explained_b"]],
            "emb_mean": float(e_part.mean()), "emb_ci": bootstrap_mean(e_part, args.bootstrap, brng),
            "emb_matched": emb["summary"]["matched_fraction_a"],
            "emb_matched_ci": bootstrap_mean(e_part >= 0.7, args.bootstrap, brng), "emb_random_pair": random_cos,
            "dec_mean": float(d_part.mean()), "dec_ci": bootstrap_mean(d_part, args.bootstrap, brng),
            "dec_matched": dec["summary"]["decoder"]["matched_fraction_a"],
            "dec_matched_ci": bootstrap_mean(d_part >= 0.7, args.bootstrap, brng),
            "shared": dec["summary"]["shared_fraction"]})

    print(f"\nSmolLM2-135M resid_post; TopK SAEs {DEMO['n_latents']} latents, k {DEMO['k']}, {DEMO['steps']} steps, lr "
          f"{DEMO['lr']}, {DEMO['n_tokens']} training tokens; extraction {args.extract_tokens} tokens (corpus seed 0); "
          f"{args.n_explain} latents per SAE explained by token_frequency; {args.bootstrap} bootstrap resamples\n")
    print("| SAE | hookpoint | seed | source | FVU (train) | dead (train) | alive in extraction | "
          "explained (skipped) |")
    print("|---|---|---:|---|---:|---:|---:|---:|")
    for s in saes:
        fvu = f"{s['fvu']:.3f}" if "fvu" in s else "–"
        dead = f"{s['dead']:.3f}" if "dead" in s else "–"
        print(f"| {s['name']} | {s['hookpoint']} | {s['seed']} | {s['trained']} | {fvu} | {dead} | {s['alive']} | "
              f"{s['sampled'] - s['skipped']} ({s['skipped']}) |")
    print("\n| pair (A vs B) | layers apart | explanation embedding: mean partner sim [95 % CI] | matched ≥ 0.7 "
          "[95 % CI] | random-pair cosine | decoder: mean partner cos [95 % CI] | decoder matched > 0.7 [95 % CI] | "
          "shared (dec + enc) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in sorted(rows, key=lambda r: (not r["same_layer"], r["apart"], r["a"], r["b"])):
        ci = lambda v: f"[{v[0]:.3f}, {v[1]:.3f}]"  # noqa: E731
        apart = "0 (other seed)" if r["same_layer"] else str(r["apart"])
        print(f"| {r['a']} vs {r['b']} | {apart} | {r['emb_mean']:.3f} {ci(r['emb_ci'])} | {r['emb_matched']:.3f} "
              f"{ci(r['emb_matched_ci'])} | {r['emb_random_pair']:.3f} | {r['dec_mean']:.3f} {ci(r['dec_ci'])} | "
              f"{r['dec_matched']:.3f} {ci(r['dec_matched_ci'])} | {r['shared']:.3f} |")
    finish(out, stamp, args, t_start, {"saes": saes, "pairs": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
