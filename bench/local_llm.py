"""Speed and fidelity of the in-process LLM (`local`: SmolLM2-135M-Instruct) on this CPU, float32 vs int8 variants.

For each variant: prefill tokens/s of one 1,100-token prompt (about one detection call at 34 examples × 32 tokens),
milliseconds per decode step on its KV cache (the judge's 0/1 list costs one step per entry), and the next-token KL
divergence from float32 on the last 8 positions of a real chat prompt (how far the variant's answers move).
The default variant is what `autointerp.llm.local_backend` runs (`_quantized`); the others are the ones tried.

  python bench/local_llm.py [--variants default,float32,all-int8,all-int8-per-channel] [--prompt-tokens 1100]
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import torch


def variants(model):
    from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig, quantize_dynamic

    from autointerp.llm.local_backend import _quantized

    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    return {
        "float32": lambda: model,
        "default": lambda: _quantized(model, "bench"),
        "all-int8": lambda: quantize_dynamic(model, {n: default_dynamic_qconfig for n in linear}, dtype=torch.qint8),
        "all-int8-per-channel": lambda: quantize_dynamic(model, {n: per_channel_dynamic_qconfig for n in linear},
                                                         dtype=torch.qint8),
    }


@torch.inference_mode()
def speed(model, n_prompt: int, n_steps: int = 24) -> tuple[float, float]:
    ids = torch.randint(100, 40000, (1, n_prompt), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids[:, :100])  # warm-up
    t = time.perf_counter()
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    prefill = time.perf_counter() - t
    past, x = out.past_key_values, torch.tensor([[42]])
    t = time.perf_counter()
    for _ in range(n_steps):
        past = model(input_ids=x, past_key_values=past, use_cache=True).past_key_values
    return n_prompt / prefill, (time.perf_counter() - t) / n_steps * 1000


@torch.inference_mode()
def last_logprobs(model, enc) -> torch.Tensor:
    return torch.log_softmax(model(**enc).logits[0, -8:].float(), -1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="float32,default,all-int8,all-int8-per-channel")
    p.add_argument("--prompt-tokens", type=int, default=1100)
    args = p.parse_args()
    warnings.simplefilter("ignore")
    from autointerp.hf_loading import load_causal_lm

    model, tok = load_causal_lm("builtin:smollm2")
    msg = [{"role": "user", "content": "Is each number even? Answer a list of 1 (yes) or 0 (no).\n1. 4\n2. 7\n3. 10\n"
                                       "4. 3\n5. 8\n6. 12\n7. 5"}]
    enc = tok.apply_chat_template(msg, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ref = last_logprobs(model, enc)
    make = variants(model)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("| variant | prefill tokens/s | decode ms/step | KL from float32 (mean / max) | top-1 agreement |")
    print("|---|---:|---:|---:|---:|")
    for name in args.variants.split(","):
        m = make[name]()
        lp = last_logprobs(m, enc)
        kl = (ref.exp() * (ref - lp)).sum(-1)
        tps, ms = speed(m, args.prompt_tokens)
        agree = float((ref.argmax(-1) == lp.argmax(-1)).float().mean())
        print(f"| {name} | {tps:,.0f} | {ms:.0f} | {kl.mean():.3f} / {kl.max():.3f} | {agree:.2f} |", flush=True)
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
