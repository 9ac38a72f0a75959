"""The demo's SAE training, the largest share of its first run: how long the two demo SAEs (seeds 0 and 1) take
trained one after the other on torch's default threads (the old demo) or side by side on one thread each (the demo
now), and what fewer steps would cost in quality.

    python bench/demo_training.py [--steps 1000 750 500] [--no-sequential]
    python bench/demo_training.py --ship     # (maintainers) train today's DEMO settings, copy into the package

It collects the demo's training activations exactly as `autointerp demo` does (SmolLM2-135M resid_post.15, the
builtin corpus, 64k tokens, corpus seed 1234) plus 16k held-out tokens from another corpus seed, then for each step
count trains both seeds with the demo's width, k and lr and prints wall time, the training FVU, the held-out FVU and
the dead fraction (latents that never fire on the training tokens). AUTOINTERP_CACHE decides where the subject model
is read from (the first run dequantizes the packaged GGUF once).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autointerp.activations import collect_activations  # noqa: E402
from autointerp.corpus import CorpusSpec  # noqa: E402
from autointerp.demo import DEMO, DEMO_HOOKPOINT, train_side_by_side  # noqa: E402
from autointerp.subject import load_subject  # noqa: E402
from autointerp.train_sae import train_topk_sae  # noqa: E402


@torch.no_grad()
def fvu(sae, x: torch.Tensor) -> float:
    err = 0.0
    for i in range(0, x.shape[0], 1024):
        vals, top = sae.pre_acts(x[i:i + 1024]).topk(sae.k, dim=-1, sorted=False)
        err += float((x[i:i + 1024] - sae.decode(vals, top)).pow(2).sum())
    return err / float((x - x.mean(0)).pow(2).sum())


def load_average() -> str:
    return " ".join(open("/proc/loadavg").read().split()[:3])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, nargs="+", default=[DEMO["steps"], 750, 500])
    ap.add_argument("--no-sequential", action="store_true", help="Skip the old way (sequential, default threads)")
    ap.add_argument("--ship", action="store_true", help="Only train the demo SAEs with today's settings (float16, "
                    "as the demo keeps them) and write them to autointerp/data/demo_saes, the package's copies")
    args = ap.parse_args()
    if args.ship:
        from autointerp.demo import write_shipped

        t = time.perf_counter()
        for path in write_shipped():
            print(f"wrote {path}")
        print(f"{time.perf_counter() - t:.0f} s")
        return
    subject = load_subject("builtin:smollm2")
    train = collect_activations(subject, DEMO_HOOKPOINT, CorpusSpec(source="builtin", ctx_len=64,
                                                                     n_tokens=DEMO["n_tokens"], seed=1234))
    held = collect_activations(subject, DEMO_HOOKPOINT, CorpusSpec(source="builtin", ctx_len=64, n_tokens=16_000,
                                                                   seed=99))
    print(f"activations: train {tuple(train.shape)}, held out {tuple(held.shape)}; torch threads "
          f"{torch.get_num_threads()}, cpus {os.cpu_count()}", flush=True)
    out = Path(tempfile.mkdtemp(prefix="demo-training-"))
    kw = dict(n_latents=DEMO["n_latents"], k=DEMO["k"], hookpoint=DEMO_HOOKPOINT, lr=DEMO["lr"])
    rows = []
    for steps in args.steps:
        ways = [("side by side, 1 thread each", None)]
        if not args.no_sequential and steps == args.steps[0]:
            ways.insert(0, ("one after the other, default threads", "seq"))
        for label, how in ways:
            la = load_average()
            t = time.perf_counter()
            if how == "seq":
                res = [train_topk_sae(train, out_dir=out / f"seq{steps}-{sd}", seed=sd, steps=steps, **kw)
                       for sd in (0, 1)]
            else:
                res = train_side_by_side(train, [0, 1], [out / f"par{steps}-{sd}" for sd in (0, 1)], steps=steps,
                                         **kw)
            wall = time.perf_counter() - t
            row = (steps, label, wall, [r.fvu for r in res], [fvu(r.model, held) for r in res],
                   [r.dead_fraction for r in res], la)
            rows.append(row)
            print(f"{steps} steps, {label}: {wall:.0f} s, train FVU {row[3][0]:.3f}/{row[3][1]:.3f}, held-out FVU "
                  f"{row[4][0]:.3f}/{row[4][1]:.3f}, dead {row[5][0]:.1%}/{row[5][1]:.1%} (load {la})", flush=True)
    print("\n| steps | how | wall s (both) | train FVU s0/s1 | held-out FVU s0/s1 | dead s0/s1 | load average |")
    print("|---:|---|---:|---|---|---|---|")
    for steps, label, wall, tr, ho, dead, la in rows:
        print(f"| {steps} | {label} | {wall:.0f} | {tr[0]:.3f} / {tr[1]:.3f} | {ho[0]:.3f} / {ho[1]:.3f} | "
              f"{dead[0]:.1%} / {dead[1]:.1%} | {la} |")


if __name__ == "__main__":
    main()
