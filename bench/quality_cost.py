"""Quality pass cost (issue 18): wall time of `extract` with its defaults, with the quality pass (the default) and
without it (--no-quality), on SmolLM2 with the demo dictionary (builtin:demo: a TopK SAE, 2048 latents, k=32, at
resid_post.15) — the path `autointerp extract` runs, store registration aside. Modes alternate run by run, so
machine noise hits both alike; with --repeats R the medians over R runs of each are compared.

    python bench/quality_cost.py                       # 100k tokens (extract's default), 1 run per mode
    python bench/quality_cost.py --n-tokens 200000 --repeats 3
    python bench/quality_cost.py --dictionary topk-neurons:32 --hookpoint mlp_neurons.2   # the unfavourable case

Reported: seconds per run, the quality pass's own seconds (manifest "quality"."seconds"), and the pass's cost as a
fraction of the extraction without it, two ways: the difference of the wall times, and the pass's own seconds.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time

import torch

from autointerp.demo import ensure_demo_dictionary
from autointerp.extract import extract
from autointerp.quality import default_quality_tokens
from autointerp.subject import load_subject


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-tokens", type=int, default=100_000, help="extract's --n-tokens (its default: 100000)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per mode; medians are compared")
    ap.add_argument("--dictionary", default="builtin:demo", help="a checkpoint (default: the demo SAE, trained once)")
    ap.add_argument("--hookpoint", default=None, help="where the dictionary reads (needed for neurons); a shallow "
                    "one is the unfavourable case: extraction stops there, the pass runs the whole model")
    ap.add_argument("--device", default=None)
    args = ap.parse_args()

    subject = load_subject("builtin:smollm2", device=args.device)
    dictionary = str(ensure_demo_dictionary(subject, progress=False)) if args.dictionary == "builtin:demo" \
        else args.dictionary
    with tempfile.TemporaryDirectory() as tmp:  # warm-up: first-call costs (kernels, tokenizer) hit neither mode
        extract(subject, dictionary, args.hookpoint, "builtin", tmp, n_tokens=2048, progress=False)
    runs: dict[bool, list[float]] = {False: [], True: []}
    quality_s: list[float] = []
    block = None
    for r in range(args.repeats):
        for quality in ((False, True) if r % 2 == 0 else (True, False)):
            with tempfile.TemporaryDirectory() as tmp:
                t = time.perf_counter()
                (cache,) = extract(subject, dictionary, args.hookpoint, "builtin", tmp, n_tokens=args.n_tokens,
                                   progress=False,
                                   quality=quality)
                runs[quality].append(time.perf_counter() - t)
                if quality:
                    block = cache.manifest["quality"]
                    quality_s.append(block["seconds"])
            print(f"run {r + 1} {'with' if quality else 'without':<7} quality: {runs[quality][-1]:8.1f} s"
                  f" ({args.n_tokens / runs[quality][-1]:.0f} tok/s)" + (f", the pass {quality_s[-1]:.1f} s"
                                                                          if quality else ""), flush=True)
    dev = subject.device
    device = torch.cuda.get_device_name(dev) if dev.type == "cuda" else \
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    without, with_q, own = (statistics.median(v) for v in (runs[False], runs[True], quality_s))
    print(f"device: {device}; SmolLM2-135M, dictionary {dictionary} at {block['hookpoint']}; extract defaults, "
          f"{args.n_tokens} tokens; quality pass over the first {default_quality_tokens(args.n_tokens)} tokens "
          f"({block['n_windows']} windows); {args.repeats} run(s) per mode")
    print(f"extraction without the pass {without:.1f} s, with it {with_q:.1f} s; the pass itself {own:.1f} s")
    print(json.dumps({"extract_s": round(without, 2), "extract_with_quality_s": round(with_q, 2),
                      "quality_pass_s": round(own, 2), "ratio_by_wall": round(with_q / without - 1, 4),
                      "ratio_by_pass": round(own / without, 4), "repeats": args.repeats,
                      "quality": {k: v for k, v in block.items() if k != "l0_hist"}}))


if __name__ == "__main__":
    main()
