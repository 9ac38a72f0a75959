"""Collector overhead: tokens/s of (forward + encode + collect) vs (forward + encode) vs the bare forward pass to the
same depth, on the same batches, interleaved batch by batch in one run (so machine noise hits all modes alike).

    python bench/extract_overhead.py --latents 16384 --hookpoint resid_post.15 --batches 12

The dictionary is a random TopK SAE of the requested size (timing does not depend on what it learned).
"""

from __future__ import annotations

import argparse
import json
import platform
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
    ap.add_argument("--encode-dtype", default="float32", help="the dictionary's dtype (extract --encode-dtype)")
    args = ap.parse_args()

    subject = load_subject("builtin:smollm2", device=args.device)
    dev = subject.device
    hook = subject.hookpoint(args.hookpoint)
    sae = random_topk_sae(subject.width(args.hookpoint), args.latents, args.k, dev)
    sae.to(dtype=getattr(torch, args.encode_dtype))
    coll = Collector(args.latents, args.ctx_len, CollectorConfig(), dev)
    spec = CorpusSpec(n_tokens=(args.batches + args.warmup) * args.batch_size * args.ctx_len, ctx_len=args.ctx_len)
    batches = [torch.from_numpy(b).long() for b in iter_windows(spec, subject.tokenizer, args.batch_size)]
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    times = {"forward": 0.0, "forward+encode": 0.0, "forward+encode+collect": 0.0}
    wid = 0
    for i, ids in enumerate(batches):
        measured = i >= args.warmup
        for mode in times:
            sync()
            t = time.perf_counter()
            x = subject.capture(ids, [hook])[hook.name]
            if mode != "forward":
                ignore = subject.special_token_mask(ids).to(dev) | subject.outlier_mask(x, 5.0)
                codes = encode_for_collector(sae, x, ignore)  # what extract() does: sparse codes for top-k SAEs
                if mode.endswith("collect"):
                    coll.update(codes, torch.arange(wid, wid + len(ids), device=dev))
                    wid += len(ids)
            sync()
            if measured:
                times[mode] += time.perf_counter() - t
    n_tok = sum(b.numel() for b in batches[args.warmup:])
    base = times["forward"]
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    print(f"device: {device_name}; model SmolLM2-135M to {args.hookpoint}; dictionary {args.latents} latents, k={args.k}, {args.encode_dtype}; "
          f"{n_tok} tokens in batches of {args.batch_size}x{args.ctx_len}")
    print(f"{'mode':<24} {'tokens/s':>10} {'time vs forward':>16}")
    for mode, t in times.items():
        print(f"{mode:<24} {n_tok / t:>10.0f} {t / base:>15.3f}x")
    print(json.dumps({"collector_overhead_vs_forward": times['forward+encode+collect'] / base - 1,
                      "encode_overhead_vs_forward": times['forward+encode'] / base - 1,
                      "collect_only_vs_forward": (times['forward+encode+collect'] - times['forward+encode']) / base}))


if __name__ == "__main__":
    main()
