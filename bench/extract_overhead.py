"""Collector overhead: tokens/s of (forward + encode + collect) vs (forward + encode) vs the bare forward pass to the
same depth, on the same batches, interleaved batch by batch in one run (so machine noise hits all modes alike).
With --repeats R the measured batches are run R times and the median ratio over the repeats is reported too.
With --prefill N, N other batches go through the collector first (untimed): its buffers then hold what a longer
run's would, and fewer latents change per batch — the regime most of a multi-million-token extraction runs in.

    python bench/extract_overhead.py --latents 16384 --hookpoint resid_post.15 --batches 12 --repeats 3

The dictionary is a random TopK SAE of the requested size (timing does not depend on what it learned).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from autointerp.collector import Collector, CollectorConfig
from autointerp.corpus import CorpusSpec, iter_windows
from autointerp.dictionaries import LinearDictionary
from autointerp.extract import encode_for_collector
from autointerp.subject import load_subject


def random_topk_sae(d_in: int, n: int, k: int, device) -> LinearDictionary:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, d_in, generator=g) / d_in**0.5
    return LinearDictionary(format="sparsify", source="random", id="random", hookpoint=None, transcoder=False,
                            W_enc=w.to(device), b_enc=torch.zeros(n, device=device), W_dec=w.clone().to(device),
                            b_dec=torch.zeros(d_in, device=device), activation="relu_topk", k=k, subtract_b_dec=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latents", type=int, default=16384)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--hookpoint", default="resid_post.15")
    ap.add_argument("--batches", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--ctx-len", type=int, default=64)
    ap.add_argument("--device", default=None)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--prefill", type=int, default=0, help="untimed batches through the collector before measuring")
    ap.add_argument("--repeats", type=int, default=1, help="run the measured batches this many times; report the median")
    ap.add_argument("--encode-dtype", default="float32", help="the dictionary's dtype (extract --encode-dtype)")
    args = ap.parse_args()

    subject = load_subject("builtin:smollm2", device=args.device)
    dev = subject.device
    hook = subject.hookpoint(args.hookpoint)
    sae = random_topk_sae(subject.width(args.hookpoint), args.latents, args.k, dev)
    sae.to(dtype=getattr(torch, args.encode_dtype))
    coll = Collector(args.latents, args.ctx_len, CollectorConfig(), dev)
    n_batches = args.prefill + args.warmup + args.batches
    spec = CorpusSpec(n_tokens=n_batches * args.batch_size * args.ctx_len, ctx_len=args.ctx_len)
    batches = [torch.from_numpy(b).long() for b in iter_windows(spec, subject.tokenizer, args.batch_size)]
    if len(batches) < n_batches:
        raise SystemExit(f"the builtin corpus gave {len(batches)} batches, {n_batches} needed")
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    modes = ("forward", "forward+encode", "forward+encode+collect")
    runs: list[dict[str, float]] = []
    wid = 0
    for ids in batches[:args.prefill]:
        wid = step(subject, hook, sae, coll, ids, modes[-1], wid)
    batches = batches[args.prefill:]
    for ids in batches[:args.warmup]:
        for mode in modes:
            wid = step(subject, hook, sae, coll, ids, mode, wid)
    for _ in range(args.repeats):
        times = dict.fromkeys(modes, 0.0)
        for ids in batches[args.warmup:]:
            for mode in modes:
                sync()
                t = time.perf_counter()
                wid = step(subject, hook, sae, coll, ids, mode, wid)
                sync()
                times[mode] += time.perf_counter() - t
        runs.append(times)
    n_tok = sum(b.numel() for b in batches[args.warmup:])
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    print(f"device: {device_name}; model SmolLM2-135M to {args.hookpoint}; dictionary {args.latents} latents, k={args.k}, {args.encode_dtype}; "
          f"{n_tok} tokens in batches of {args.batch_size}x{args.ctx_len}; {args.repeats} repeat(s); "
          f"collector prefilled with {args.prefill} batches")
    print(f"{'repeat':<7} {'mode':<24} {'tokens/s':>10} {'time vs forward':>16}")
    for r, times in enumerate(runs, 1):
        for mode, t in times.items():
            print(f"{r:<7} {mode:<24} {n_tok / t:>10.0f} {t / times['forward']:>15.3f}x")

    fwd, enc, coll_ = modes

    def median(ratio) -> float:
        return statistics.median(ratio(t) for t in runs)

    print(json.dumps({"collector_overhead_vs_forward": median(lambda t: t[coll_] / t[fwd] - 1),
                      "encode_overhead_vs_forward": median(lambda t: t[enc] / t[fwd] - 1),
                      "collect_only_vs_forward": median(lambda t: (t[coll_] - t[enc]) / t[fwd]),
                      "repeats": args.repeats, "prefill_batches": args.prefill, "statistic": "median over repeats"}))

def step(subject, hook, sae, coll, ids, mode: str, wid: int) -> int:
    """One batch in one mode; returns the next window id."""
    dev = subject.device
    x = subject.capture(ids, [hook])[hook.name]
    if mode != "forward":
        ignore = subject.special_token_mask(ids).to(dev) | subject.outlier_mask(x, 5.0)
        codes = encode_for_collector(sae, x, ignore)  # what extract() does: sparse codes for top-k SAEs
        if mode.endswith("collect"):
            coll.update(codes, torch.arange(wid, wid + len(ids), device=dev))
            wid += len(ids)
    return wid

if __name__ == "__main__":
    main()
