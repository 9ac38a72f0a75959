"""The built-in demo dictionary: a small TopK SAE trained once on SmolLM2's middle layer, then cached.

No pretrained SAE can be installed offline, so `builtin:demo` trains one (a couple of minutes on a laptop CPU) the
first time it is asked for, under the autointerp cache folder; later runs load it in milliseconds.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

from .corpus import CorpusSpec
from .errors import ConfigError
from .paths import cache_root

log = logging.getLogger(__name__)

DEMO_HOOKPOINT = "resid_post.15"
# lr 2e-3, not the width-scaled default (5.7e-4): in 1000 steps the default left decoder rows at median cosine 0.47
# with their random init; at 2e-3 0.18, FVU 0.167 vs 0.186, 11 % dead vs 2 % (bench/three_saes.py --probe-lr).
# 750 steps, not 1000: the training was the largest share of a first run (twice that on a busy machine); held-out FVU
# 0.205 vs 0.199, dead 7 % vs 11 %, 25 % less time (bench/demo_training.py). Version 6: trained side by side.
# Version 7: the weights are kept in float16 (what the package ships, autointerp/data/demo_saes, and what a machine
# without that copy trains and rounds): a first run copies them instead of training for minutes.
DEMO = {"n_latents": 2048, "k": 32, "n_tokens": 64_000, "seed": 0, "steps": 750, "lr": 2e-3, "version": 7,
        "dtype": "float16"}
SHIPPED = Path(__file__).resolve().parent / "data" / "demo_saes"


def demo_dictionary_path(seed: int = 0) -> Path:
    name = "demo-smollm2-v{version}-{n_latents}-k{k}-{n_tokens}tok-{steps}steps".format(**DEMO)
    return cache_root() / "dictionaries" / (name if seed == DEMO["seed"] else f"{name}-seed{seed}")


def _trained(root: Path) -> Path | None:
    folder = root / DEMO_HOOKPOINT
    return folder if (folder / "cfg.json").is_file() and (folder / "sae.safetensors").is_file() else None


def _shipped(seed: int) -> Path | None:
    """The package's copy of a demo SAE (sparsify folder under it), when it was made with today's DEMO settings."""
    folder = SHIPPED / f"seed{seed}"
    try:
        made = json.loads((folder / "demo.json").read_text())
    except (OSError, ValueError):
        return None
    return folder if made == {**DEMO, "seed": seed} and _trained(folder) is not None else None


def write_shipped(seeds: tuple[int, ...] = (0, 1)) -> list[Path]:
    """Copy this machine's demo SAEs (training them if needed) into the package's data folder, with the settings
    that made them (bench/demo_training.py --ship; a maintainer's step when DEMO changes)."""
    ensure_demo_dictionary(seeds=seeds, use_shipped=False)
    out = []
    for sd in seeds:
        dest = SHIPPED / f"seed{sd}"
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(demo_dictionary_path(sd) / DEMO_HOOKPOINT, dest / DEMO_HOOKPOINT)
        (dest / "demo.json").write_text(json.dumps({**DEMO, "seed": sd}, indent=1))
        out.append(dest)
    return out


def _copy_shipped(seed: int) -> bool:
    src = _shipped(seed)
    if src is None:
        return False
    dest = demo_dictionary_path(seed)
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src / DEMO_HOOKPOINT, tmp / DEMO_HOOKPOINT)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)  # whole or absent: a copy cut short is never taken for the SAE
    return True


def _as_half(folder: Path) -> None:
    """Round a trained checkpoint's float tensors to float16 in place (DEMO["dtype"]): the demo SAE is the rounded
    one, whether shipped or trained here."""
    from safetensors.torch import load_file, save_file

    path = folder / DEMO_HOOKPOINT / "sae.safetensors"
    tensors = {k: v.half().contiguous() if v.is_floating_point() else v for k, v in load_file(str(path)).items()}
    tmp = path.with_name(path.name + ".partial")
    save_file(tensors, str(tmp))
    tmp.replace(path)


def ensure_demo_dictionary(subject=None, progress: bool = True, seeds: tuple[int, ...] = (0,),
                           use_shipped: bool = True) -> Path:
    """Path to the demo SAE's sparsify folder (a hookpoint subfolder inside): the package's copy when it ships one
    for today's settings, else trained here once. With several `seeds`, SAEs of the other seeds are trained on the
    same activations (collected once) — two seeds on one layer are what the demo compares; the first seed's folder
    is returned."""
    missing = [sd for sd in seeds if _trained(demo_dictionary_path(sd)) is None
               and not (use_shipped and _copy_shipped(sd))]
    if missing:
        from .activations import collect_activations
        from .subject import load_subject

        if subject is None:
            subject = load_subject("builtin:smollm2")
        if not subject.spec.startswith("builtin:smollm2"):
            raise ConfigError("dictionary builtin:demo is trained for --model builtin:smollm2; pass your own "
                              "--dictionary")
        # a corpus seed different from extraction's default, so the SAE is not evaluated on its own training windows
        spec = CorpusSpec(source="builtin", ctx_len=64, n_tokens=DEMO["n_tokens"], seed=1234)
        acts = collect_activations(subject, DEMO_HOOKPOINT, spec, progress=progress)
        log.info("training the demo dictionaries (seeds %s) once into %s", missing,
                 ", ".join(str(demo_dictionary_path(sd)) for sd in missing))
        tmp = [demo_dictionary_path(sd).with_name(demo_dictionary_path(sd).name + ".partial") for sd in missing]
        train_side_by_side(acts, missing, tmp, n_latents=DEMO["n_latents"], k=DEMO["k"], hookpoint=DEMO_HOOKPOINT,
                           steps=DEMO["steps"], lr=DEMO["lr"], progress=progress)
        for sd, t in zip(missing, tmp):
            _as_half(t)
            shutil.rmtree(demo_dictionary_path(sd), ignore_errors=True)
            t.rename(demo_dictionary_path(sd))
    return demo_dictionary_path(seeds[0]) / DEMO_HOOKPOINT


def train_side_by_side(acts, seeds: list[int], out_dirs: list[Path], progress: bool = False, **kw) -> list:
    """One SAE per seed, each on one torch thread in a thread of its own, all at once: small matmuls scale poorly
    across threads, so two single-threaded trainings side by side finish ~25 % sooner than one after the other on
    both cores, and more so on a busy machine (bench/demo_training.py). Single-threaded training is deterministic,
    so each result is the one a sequential single-threaded run gives. One progress bar (the first seed's: they run
    at one pace). Raises the first failure."""
    import threading

    import torch

    from .train_sae import train_topk_sae

    results: dict[int, object] = {}

    def one(i: int) -> None:
        try:
            results[i] = train_topk_sae(acts, out_dir=out_dirs[i], seed=seeds[i], progress=progress and i == 0, **kw)
        except BaseException as e:  # noqa: BLE001 — raised in the caller below
            results[i] = e

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # process-wide: every training thread runs its ops on one core
    try:
        threads = [threading.Thread(target=one, args=(i,), name=f"train-seed{sd}") for i, sd in enumerate(seeds)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        torch.set_num_threads(before)
    for i in range(len(seeds)):
        if isinstance(results[i], BaseException):
            raise results[i]
    return [results[i] for i in range(len(seeds))]


# ----------------------------------------------------------------------------------------------- the demo run

# Smaller test sets than the defaults: the local 135M explainer/judge answers one call at a time on a CPU (~400
# prompt tokens/s, a forward step per answer entry), and these keep its part of the first run to a few minutes:
# explain + 1 detection call (24 examples) + 1 fuzzing call (12) per latent.
DEMO_SAMPLING = {"n_explain": 12, "n_test": 12, "n_negatives": 12, "n_explain_negatives": 0, "min_explain": 5,
                 "min_test": 8, "min_negatives": 8}
DEMO_SCORERS = ["detection", "fuzzing", "embedding"]


class _Steps:
    def __init__(self, total: int, echo):
        self.n, self.total, self.echo, self.t0 = 0, total, echo, time.perf_counter()

    def __call__(self, what: str) -> None:
        self.n += 1
        self.echo(f"\n[demo {self.n}/{self.total}] {what}  (+{time.perf_counter() - self.t0:.0f} s)")


def demo_extraction(n_tokens: int) -> dict:
    """The demo's extraction as job-spec data: both seeds' SAEs in one forward pass (the seed-0 SAE is the job's
    dictionary, seed 1 rides along), named `demo` and `demo-seed1` in the store."""
    return {"model": "builtin:smollm2", "dictionary": str(demo_dictionary_path(0) / DEMO_HOOKPOINT),
            "also": [str(demo_dictionary_path(1) / DEMO_HOOKPOINT)], "names": ["demo", "demo-seed1"],
            "corpus": "builtin", "n_tokens": n_tokens}


def run_demo(out: Path, *, n_tokens: int = 60_000, n_latents: int = 8, explainer_model: str = "local",
             judge_model: str | None = None, echo=print, progress: bool = True) -> dict:
    """The main job end to end through the job seam: two demo SAEs (two seeds, one layer) trained once, then one
    job from the subject model, the SAE and the corpus to scores — its extraction stage collects both SAEs in one
    pass and stores their examples — with LLM explanations scored by detection, fuzzing and embedding beside the
    token-frequency and random baselines (jobs on the same extraction, which they reuse), explanations embedded for
    search, the two SAEs compared, a plot. Everything lands in the store; a second run reuses all of it (the store
    knows the extraction and the jobs: no model is loaded). Returns what the summary and the server need."""
    from .jobs import ExtractionSpec, run, submit
    from .jobs.extraction import share_subject
    from .plots import write_dictionary_plot
    from .search import embed_explanations
    from .store import open_store

    step = _Steps(7, echo)
    store = open_store()
    extraction = demo_extraction(n_tokens)
    members = ExtractionSpec(**extraction).members()
    trained = all(_trained(demo_dictionary_path(sd)) is not None for sd in (0, 1))
    extracted = all(store.dictionary_by_extraction(m.key()) is not None for m in members)
    if trained and extracted:  # a second run: no model to load, nothing to train or extract
        step("subject model: not needed (the demo's SAEs and their extraction are in the store)")
        step("two demo SAEs on resid_post.15 (2048 latents, TopK 32; seeds 0 and 1): reused")
    else:
        step("subject model: SmolLM2-135M (the first run dequantizes the packaged GGUF once)")
        from .subject import load_subject

        subject = share_subject(load_subject("builtin:smollm2"))  # the extraction stage runs on this one
        step("two demo SAEs on resid_post.15 (2048 latents, TopK 32; seeds 0 and 1): "
             + ("the package's copies" if all(_shipped(sd) for sd in (0, 1)) else "trained once and cached"))
        ensure_demo_dictionary(subject, progress=progress, seeds=(0, 1))
    common = {"extraction": extraction, "n_latents": n_latents, "scorers": DEMO_SCORERS, "sampling": DEMO_SAMPLING,
              "judge_model": judge_model or explainer_model, "explainer_model": explainer_model}
    jobs = {}
    step(f"one job: extraction of both SAEs in one pass over {n_tokens} tokens (reused when done), then "
         f"{n_latents} latents explained with {explainer_model} and scored ({', '.join(DEMO_SCORERS)})")
    for kind in ("default", "token_frequency", "random"):  # random draws from the others' explanations
        if kind != "default":
            echo(f"  baseline: {kind} explanations, same latents, same scorers")
        jobs[kind] = submit(store, {**common, "explainer": kind})
        run(store, jobs[kind], progress=progress)
    da, db = store.dictionary("demo"), store.dictionary("demo-seed1")
    step("explanations of both SAEs for search and comparison (token-frequency baseline, 256 latents each)")
    for m in members:
        j = submit(store, {"extraction": m.model_dump(mode="json"), "n_latents": 256, "explainer": "token_frequency",
                           "scorers": [], "hard_negatives": False})
        run(store, j, progress=progress)
    embedded = embed_explanations(store, progress=progress)
    step("comparing the two SAEs")
    comparison = compare_demo(store, da, db)
    step("summary")
    plot = write_dictionary_plot(store, da["id"], Path(out) / "plots" / "demo.png")
    return {"store": store, "jobs": jobs, "dictionaries": (da, db), "embedded": embedded, "plot": plot,
            "comparison": comparison, "elapsed_s": time.perf_counter() - step.t0}


def demo_summary_text(r: dict) -> str:
    """The summary `autointerp demo` prints from what `run_demo` returned: each scorer's headline metric per
    explainer (mean over latents), the best LLM explanations by detection, the LLM usage, the two seeds'
    comparisons and where the search and the plot are."""
    from .jobs import status
    from .jobs.export import export_rows
    from .store import HEADLINE

    store = r["store"]
    rows = {kind: list(export_rows(store, job_id=j)) for kind, j in r["jobs"].items()}
    lines = [f"{'scorer':<10} {'metric':<18} " + " ".join(f"{k:>16}" for k in rows) + "   (mean over latents; n)"]
    for scorer in ("detection", "fuzzing", "embedding"):
        cells = []
        for kind, rs in rows.items():
            v = [x["metrics"].get(HEADLINE[scorer]) for x in rs if x["type"] == "score" and x["scorer"] == scorer
                 and not x["skipped"]]
            v = [x for x in v if x is not None]
            cells.append(f"{sum(v) / len(v):>11.3f} ({len(v):>2})" if v else f"{'-':>16}")
        lines.append(f"{scorer:<10} {HEADLINE[scorer]:<18} " + " ".join(cells))
    lines.append("(a 135M explainer and judge are weak: read the LLM column against the baselines, not as a grade)"
                 if "default" in rows else "")
    llm = rows.get("default", [])
    text = {x["explanation_id"]: x["text"] for x in llm if x["type"] == "explanation"}
    det = sorted((x for x in llm if x["type"] == "score" and x["scorer"] == "detection" and not x["skipped"]),
                 key=lambda x: -(x["metrics"].get("balanced_accuracy") or 0))
    lines.append(f"\n{'latent':>7} {'detect':>7}  explanation (LLM), best first")
    for x in det[:8]:
        lines.append(f"{x['latent']:>7} {x['metrics'].get('balanced_accuracy') or 0:>7.3f}  "
                     f"{(text.get(x['explanation_id']) or '')[:88]}")
    spend = [status(store, j).spend for j in r["jobs"].values()]
    lines.append(f"\nLLM usage: {sum(s['calls'] for s in spend)} calls, {sum(s['prompt_tokens'] for s in spend)} "
                 f"prompt + {sum(s['completion_tokens'] for s in spend)} completion tokens, "
                 f"${sum(s['cost_usd'] for s in spend):.4f}")
    for method, (summary, cid) in (r.get("comparison") or {}).items():
        if method == "decoder":
            lines.append(f"demo vs demo-seed1 by decoder/encoder cosine: {summary['shared_fraction']:.1%} of latents "
                         f"shared (both > 0.7; Paulo & Belrose report 53 % for two seeds at 32k) [comparison {cid}]")
        else:
            lines.append(f"demo vs demo-seed1 by explanation meaning: {summary['matched_fraction_a']:.1%} of "
                         f"{summary['explained_a']} explained latents matched (cosine >= 0.7) [comparison {cid}]")
    lines.append(f"{r['embedded']} explanations embedded for search (try: autointerp search \"numbers\")")
    if r.get("plot"):
        lines.append(f"plot: {r['plot']}")
    return "\n".join(lines)


def compare_demo(store, a: dict, b: dict) -> dict:
    """The two seeds compared by their decoders/encoders (Paulo & Belrose's shared latents) and by the meaning of
    their explanations: {method: (summary, comparison id)}."""
    from .compare import compare

    out = {}
    for method in ("decoder", "embedding"):
        out[method] = _stored_comparison(store, a, b, method)
        if out[method] is None:
            r = compare(store, a["name"], b["name"], method)
            out[method] = (r["summary"], r["id"])
    return out


def _stored_comparison(store, a: dict, b: dict, method: str):
    """(summary, id) of the newest stored comparison of a and b by `method` that is still current (by meaning: no
    explanation of either dictionary is newer), else None."""
    from sqlalchemy import func, select

    from .store.tables import Comparison, ExplanationRow

    c, e = Comparison.__table__, ExplanationRow.__table__
    with store.tx() as conn:
        row = conn.execute(select(c.c.id, c.c.summary, c.c.created)
                           .where(c.c.dictionary_a == a["id"], c.c.dictionary_b == b["id"], c.c.method == method)
                           .order_by(c.c.id.desc()).limit(1)).first()
        if row is None:
            return None
        if method == "embedding":
            newest = conn.execute(select(func.max(e.c.created))
                                  .where(e.c.dictionary_pk.in_([a["id"], b["id"]]))).scalar()
            if newest is not None and newest > row.created:
                return None
    return row.summary, row.id
