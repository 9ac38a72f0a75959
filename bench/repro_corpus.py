"""Two corpus-level reproductions at this machine's scale (issue 20), through the library's corpus seam
(autointerp.corpus_latents) with the demo SAE on SmolLM2-135M:

  separability  "SAEs are more separable than neurons" (Evaluating SAEs for monosemantic representation): labelled
                texts of two topics -> per latent the JS distance between its max-activation distributions on each
                topic; the best latent and the mean of the 10 best, for the demo SAE (resid_post.15, 2048 latents),
                the raw residual dimensions at the same hookpoint (`neurons`, both signs as poles: 1152 units) and
                the MLP neurons of the same layer (`neurons` at mlp_neurons.15, 3072 poles), with bootstrap 95 %
                intervals over documents.
  diff          "dataset diffing finds what differs": prose documents, and the same documents with a snippet of
                Python source appended to 30 % of them; the top 10 latents by firing-rate difference, and how many of
                them peak on code tokens (a Python keyword, or punctuation/indentation only) in their best documents.

  python bench/repro_corpus.py                      # both, defaults below
  python bench/repro_corpus.py --only diff --docs 400
"""

from __future__ import annotations

import argparse
import keyword
import os
import random
import re
import time

import numpy as np

from autointerp.corpus import CorpusSpec, iter_documents
from autointerp.corpus_latents import LatentReader, Side, diff, document_codes, histograms, js_distance


def topic_texts(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Two topics from the standard library's docstrings: files and paths vs threads, processes and locks; a
    docstring counts for a topic when it names two of the topic's words and none of the other's."""
    files = ("file", "path", "directory", "filename", "folder", "disk")
    conc = ("thread", "lock", "process", "queue", "semaphore", "concurrent")
    a, b = [], []
    for d in iter_documents(CorpusSpec(source="builtin"), ordered=True):
        low = d.lower()
        fa = sum(w in low for w in files)
        fb = sum(w in low for w in conc)
        if fa >= 2 and fb == 0 and len(a) < n:
            a.append(d)
        elif fb >= 2 and fa == 0 and len(b) < n:
            b.append(d)
        if len(a) >= n and len(b) >= n:
            break
    return a, b


def separability_run(reader: LatentReader, a: list[str], b: list[str], max_tokens: int, boot: int, seed: int):
    values = [(r.latents, r.max) for r in document_codes(reader, CorpusSpec(source="<texts>"), documents=a + b,
                                                          max_tokens=max_tokens, progress=False)]
    y = np.array([1] * len(a) + [0] * len(b))

    def stats(idx):
        hist, _ = histograms([values[i] for i in idx], y[idx], reader.n_latents)
        js = np.sort(js_distance(hist[1].astype(float), hist[0].astype(float)))[::-1]
        return js[0], js[:10].mean()

    best, top10 = stats(np.arange(len(y)))
    rng = np.random.default_rng(seed)
    bs = np.array([stats(np.concatenate([rng.choice(np.nonzero(y == 1)[0], len(a)),
                                         rng.choice(np.nonzero(y == 0)[0], len(b))])) for _ in range(boot)])
    lo, hi = np.percentile(bs, [2.5, 97.5], axis=0)
    # the same resamples for every dictionary (the generator is seeded alike): paired comparisons read `boot`
    return {"best": (best, lo[0], hi[0]), "top10": (top10, lo[1], hi[1]), "boot": bs}


CODE_PUNCT = re.compile(r"^[\s()\[\]{}:=.,+\-*/%<>!'\"#@_]+$")


def is_code_token(tok: str) -> bool:
    s = tok.strip()
    if not s:
        return "\n" in tok and tok.endswith(" ")  # a newline plus indentation
    return keyword.iskeyword(s) or bool(CODE_PUNCT.match(s))


def code_snippets(n: int, seed: int) -> list[str]:
    """n chunks of 6-12 lines of standard-library source, each starting at a `def`."""
    rng = random.Random(seed)
    out = []
    for src in iter_documents(CorpusSpec(source="builtin:code", seed=seed)):
        lines = src.splitlines()
        starts = [i for i, line in enumerate(lines) if line.lstrip().startswith("def ")]
        rng.shuffle(starts)
        for s in starts[:2]:
            chunk = "\n".join(lines[s:s + rng.randint(6, 12)])
            if chunk.count("\n") >= 5:
                out.append(chunk)
        if len(out) >= n:
            return out[:n]
    return out


def diff_run(reader: LatentReader, n_docs: int, share: float, max_tokens: int, seed: int, top: int = 10):
    prose = [d for _, d in zip(range(n_docs), iter_documents(CorpusSpec(source="builtin", seed=seed + 1)))]
    rng = random.Random(seed)
    chosen = set(rng.sample(range(len(prose)), int(round(share * len(prose)))))
    snippets = code_snippets(len(chosen), seed)
    # the snippet goes first: documents are read to --max-tokens, so an appended one could fall past the cut
    injected = [snippets.pop() + "\n\n" + d if i in chosen and snippets else d for i, d in enumerate(prose)]
    r = diff(reader, Side("with code", texts=injected), Side("prose", texts=prose), max_tokens=max_tokens, top=top,
             progress=False)
    rows = []
    for row in r["rows"]:
        peaks = [e["tokens"][e["peak"]] for e in row["examples_a"]]
        in_chosen = sum(e["doc"] in chosen for e in row["examples_a"])
        rows.append({"latent": row["latent"], "rate_code": row["rate_a"], "rate_prose": row["rate_b"],
                     "q": row["q"], "peaks": peaks, "code": sum(map(is_code_token, peaks)) * 2 > len(peaks),
                     "best_docs_injected": f"{in_chosen}/{len(row['examples_a'])}"})
    return r["summary"], rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["separability", "diff"], default=None)
    ap.add_argument("--topic-docs", type=int, default=120, help="documents per topic (separability)")
    ap.add_argument("--docs", type=int, default=300, help="prose documents (diff)")
    ap.add_argument("--share", type=float, default=0.3, help="share of documents given code (diff)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--boot", type=int, default=200, help="bootstrap resamples (separability)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from autointerp.demo import DEMO_HOOKPOINT, ensure_demo_dictionary
    from autointerp.subject import load_subject

    t0 = time.perf_counter()
    subject = load_subject("builtin:smollm2", device="cpu")
    sae = str(ensure_demo_dictionary(subject))
    print(f"load {os.getloadavg()[0]:.1f} (1 min) on {os.cpu_count()} CPUs")
    readers = {"demo SAE (resid_post.15)": (sae, DEMO_HOOKPOINT),
               "neurons (resid_post.15)": ("neurons", DEMO_HOOKPOINT),
               "neurons (mlp_neurons.15)": ("neurons", "mlp_neurons.15")}

    def reader(spec, hp):
        from autointerp.dictionaries import as_units
        from autointerp.extract import _load_dictionary

        return LatentReader(subject, as_units(_load_dictionary(spec, subject, hp, "cpu")), hp, "builtin:smollm2", spec)

    if args.only in (None, "separability"):
        a, b = topic_texts(args.topic_docs, args.seed)
        print(f"\nseparability: {len(a)} docstrings about files/paths vs {len(b)} about threads/processes/locks, "
              f"{args.max_tokens} tokens each, {args.boot} bootstrap resamples")
        print(f"  {'dictionary':<28} {'units':>6} {'best latent JS [95% CI]':>28} {'mean of top 10 [95% CI]':>28}")
        boots = {}
        for name, (spec, hp) in readers.items():
            rd = reader(spec, hp)
            s = separability_run(rd, a, b, args.max_tokens, args.boot, args.seed)
            boots[name] = s["boot"]
            fmt = "{:.3f} [{:.3f}, {:.3f}]"
            print(f"  {name:<28} {rd.n_latents:>6} {fmt.format(*s['best']):>28} {fmt.format(*s['top10']):>28}")
        sae, *others = boots
        for o in others:  # paired: the same resampled documents for both
            win = (boots[sae] > boots[o]).mean(axis=0)
            print(f"  {sae} > {o}: in {win[0]:.0%} of resamples (best latent), {win[1]:.0%} (mean of top 10)")
    if args.only in (None, "diff"):
        rd = reader(sae, DEMO_HOOKPOINT)
        summary, rows = diff_run(rd, args.docs, args.share, args.max_tokens, args.seed)
        print(f"\ndiff: {summary['docs_a']} documents, {args.share:.0%} with a Python snippet first, vs the same "
              f"documents without; {summary['n_significant']} latents significant at FDR 0.05 "
              f"({summary['more_in_a']} more with code)")
        print(f"  {'latent':>6} {'with code':>9} {'prose':>6} {'q':>9}  {'code?':<5} {'best docs injected':<18} peaks")
        for r in rows:
            print(f"  {r['latent']:>6} {r['rate_code']:>9.3f} {r['rate_prose']:>6.3f} {r['q']:>9.1e}  "
                  f"{'yes' if r['code'] else 'no':<5} {r['best_docs_injected']:<18} {[p for p in r['peaks']]}")
        print(f"  {sum(r['code'] for r in rows)} of the top {len(rows)} peak on code tokens")
    print(f"\n{time.perf_counter() - t0:.0f} s, load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
