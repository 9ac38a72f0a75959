"""`autointerp …` — the command line. Every command has --help; bad input exits 2 with one line naming the problem,
and so does an LLM server that refuses the job (bad credentials, unknown model); other LLM failures exit 1."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from .errors import AutointerpError
from .llm.base import LLMError, PermanentLLMError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Automatically explain and score the latents of sparse autoencoders and transcoders.")


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())  # server messages may hold newlines


def _friendly(fn):
    """Bad input and LLM errors become a one-line message and a non-zero exit code, never a traceback:
    AutointerpError and PermanentLLMError (bad credentials, unknown model: the user's to fix) exit 2, other
    LLMErrors 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        logging.basicConfig(level=os.environ.get("AUTOINTERP_LOG", "WARNING"), format="%(levelname)s %(message)s")
        try:
            return fn(*args, **kwargs)
        except (AutointerpError, PermanentLLMError) as e:
            typer.echo(f"error: {_one_line(e)}", err=True)
            raise typer.Exit(2)
        except LLMError as e:
            typer.echo(f"error: {_one_line(e)}", err=True)
            raise typer.Exit(1)

    return wrapper


def _parse_scorer_options(items: list[str], batch_size: int | None, scorers: list[str]) -> dict:
    """`scorer.field=value` strings (value as JSON when it parses, else a plain string) and --batch-size (the
    detection and fuzzing batch) -> the job spec's scorer_options."""
    from .errors import ConfigError

    out: dict[str, dict] = {}
    if batch_size is not None:
        for n in ("detection", "fuzzing"):
            if n in scorers:
                out.setdefault(n, {})["batch_size"] = batch_size
    for item in items:
        key, eq, raw = item.partition("=")
        name, dot, fld = key.strip().partition(".")
        if not (eq and dot and name and fld):
            raise ConfigError(f"--scorer-option {item!r}: expected SCORER.FIELD=VALUE, e.g. detection.batch_size=10")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        out.setdefault(name, {})[fld] = value
    return out


def _resolve_dictionary(spec: str, subject):
    if spec == "builtin:demo":
        from .demo import ensure_demo_dictionary

        return str(ensure_demo_dictionary(subject))
    return spec


@app.command()
@_friendly
def extract(
    model: str = typer.Option("builtin:smollm2", help="Subject model: builtin:smollm2, a local folder, a .gguf file or a hub id."),
    dictionary: List[str] = typer.Option(["builtin:demo"], "--dictionary", "-d",
                                         help="Dictionary (repeatable): a checkpoint folder/file, a hub id, "
                                              "'neurons', 'topk-neurons:K' or builtin:demo."),
    hookpoint: Optional[List[str]] = typer.Option(None, "--hookpoint", help="Hookpoint (repeatable, one per dictionary "
                                                  "or one for all): resid_post.N, mlp_out.N, attn_out.N, mlp_in.N, "
                                                  "mlp_neurons.N or a module path. Default: what the checkpoint names."),
    corpus: str = typer.Option("builtin", help="builtin, builtin:code, a .txt/.jsonl/.parquet file or folder, or hf:NAME."),
    out: Path = typer.Option(Path("runs/extract"), help="Output folder (a cache; several targets get subfolders)."),
    n_tokens: int = typer.Option(100_000, help="Tokens to process."),
    ctx_len: int = typer.Option(64, help="Window length in tokens (BOS included)."),
    batch_size: int = typer.Option(32, help="Windows per forward pass."),
    top_k: int = typer.Option(50, help="Top-activating windows kept per latent (sampling draws 20 to explain, and "
                                       "the upper test deciles from the rest)."),
    n_sample: int = typer.Option(100, help="Uniformly sampled activating windows kept per latent (the lower test "
                                           "deciles)."),
    pool_size: int = typer.Option(1000, help="Shared random windows kept for negatives."),
    text_column: str = typer.Option("text", help="Text column of .jsonl/.parquet/HF corpora."),
    split: str = typer.Option("train", help="HF dataset split."),
    seed: int = typer.Option(0, help="Corpus shuffle and sampling seed."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 … (default: CUDA when present)."),
    dtype: Optional[str] = typer.Option(None, help="Model dtype: float32, bfloat16, float16 (default: bf16 on GPU)."),
    encode_dtype: Optional[str] = typer.Option(None, help="Dictionary weights and encode matmul: float32 (default, "
                                               "codes exactly as the source library) or bfloat16 (faster, codes "
                                               "within bf16 rounding)."),
    norm_scaling_factor: Optional[float] = typer.Option(None, help="SAELens checkpoints with normalize_activations="
                                                        "expected_average_only_in: the dataset factor inputs are "
                                                        "scaled by (not stored in the checkpoint; 1.0 = none)."),
    overwrite: bool = typer.Option(False, help="Replace whatever the output folder holds."),
    progress: bool = typer.Option(True, help="Show a progress bar with tokens/s."),
    checkpoint_every: float = typer.Option(120.0, help="Seconds between resumable checkpoints."),
    max_norm_ratio: float = typer.Option(5.0, help="Ignore positions whose activation norm exceeds this × the "
                                                    "batch median (massive-activation outliers); 0 keeps all."),
    check_corpus: bool = typer.Option(True, help="Local corpus files: tokenize the part the run reads once before "
                                                 "starting, so a bad line fails at once with nothing written (~1 % of "
                                                 "a CPU run's time)."),
    max_memory: Optional[float] = typer.Option(None, help="GiB the run may use (default: what the machine has "
                                               "available); a plan over it is refused before anything is written."),
    quality: bool = typer.Option(True, help="Measure the dictionary on the first windows (L0, FVU, loss with its "
                                            "reconstruction spliced in, dead/dense latents) into the manifest."),
    quality_tokens: Optional[int] = typer.Option(None, min=1, help="Tokens the quality pass reads (default: 0.5 % "
                                                 "of --n-tokens, which costs ~6 % of the extraction)."),
    chat: bool = typer.Option(False, help="The corpus is conversations (a .jsonl of {\"messages\": [{role, "
                                          "content}, ...]}): rendered by the model's chat template, one "
                                          "conversation per window run, each token's role kept (assistant_share)."),
    special_tokens: str = typer.Option("keep", help="--chat: keep or drop the template's special tokens "
                                                    "(<|im_start|>, <|im_end|>, ...)."),
):
    """Run the subject model over a corpus and collect every latent's contexts and statistics (resumable)."""
    from .extract import extract as run
    from .subject import load_subject

    from .corpus import CorpusSpec

    spec = CorpusSpec(source=corpus, ctx_len=ctx_len, n_tokens=n_tokens, seed=seed, text_column=text_column,
                      split=split, chat=chat, special_tokens=special_tokens)
    spec.validate()  # bad options fail before the model loads
    subject = load_subject(model, device=device, dtype=dtype)
    dicts = [_resolve_dictionary(d, subject) for d in dictionary]
    caches = run(subject, dicts, list(hookpoint) if hookpoint else None, spec, out, n_tokens=n_tokens,
                 ctx_len=ctx_len, batch_size=batch_size, seed=seed, top_k=top_k, n_sample=n_sample,
                 pool_size=pool_size, text_column=text_column, split=split, overwrite=overwrite, progress=progress,
                 checkpoint_every_s=checkpoint_every, max_norm_ratio=max_norm_ratio, encode_dtype=encode_dtype,
                 norm_scaling_factor=norm_scaling_factor, check_corpus=check_corpus, max_memory=max_memory,
                 quality=quality, quality_tokens=quality_tokens)
    from .cache import summary_text
    from .store import open_store

    store = open_store()
    for c in caches:
        row = store.register_cache(c)
        typer.echo(summary_text(c, tokenizer=subject.tokenizer))
        typer.echo(f"registered in the store as dictionary {row['name']!r} ({row['n_latents']} latents)")


@app.command()
@_friendly
def inspect(
    cache: str = typer.Argument(..., help="A cache folder written by `autointerp extract`, or the store name it "
                                          "printed."),
    latent: Optional[int] = typer.Option(None, help="Show this latent's top and sampled windows."),
    n: int = typer.Option(5, help="Windows to show."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
):
    """Summarise a latent cache, or show one latent's contexts."""
    from .cache import summary_text
    from .hf_loading import load_tokenizer

    c = _cache_folder(cache)
    if latent is None and as_json:  # numbers only: no tokenizer needed
        typer.echo(json.dumps(c.summary(), indent=1))
        return
    tok = load_tokenizer(c.manifest["model"])
    if latent is None:
        typer.echo(summary_text(c, tokenizer=tok))
        return
    c.attach_tokenizer(tok)
    rec = c.record(latent)
    if as_json:
        typer.echo(json.dumps({"latent": latent, "stats": {"frequency": rec.stats.frequency, "max": rec.stats.max_act,
                                                          "mean": rec.stats.mean_act},
                               "top": [{"text": "".join(rec.token_strings(t)), "max": float(a.max())}
                                       for t, a in zip(rec.top.tokens[:n], rec.top.acts[:n])]}, indent=1))
        return
    typer.echo(f"latent {latent}: frequency {rec.stats.frequency:.2e}, max {rec.stats.max_act:.2f}, "
               f"mean {rec.stats.mean_act:.2f}, {len(rec.top)} top / {len(rec.sample)} sampled / "
               f"{len(rec.negatives)} negative windows")
    for title, ex in (("top", rec.top), ("sample", rec.sample)):
        typer.echo(f"-- {title}")
        for t, a in zip(ex.tokens[:n], ex.acts[:n]):
            thr = 0.3 * a.max() if a.max() > 0 else 1
            words = [f"<<{w}>>" if v >= thr else w for w, v in zip(rec.token_strings(t), a)]
            typer.echo(f"[{a.max():6.2f}] " + "".join(words).replace("\n", "⏎"))


@app.command("train-sae")
@_friendly
def train_sae(
    model: str = typer.Option("builtin:smollm2", help="Subject model."),
    hookpoint: Optional[str] = typer.Option(None, help="Where to read activations (default resid_post.15). Trains a "
                                                       "plain SAE (codes reconstruct the same activations); "
                                                       "transcoders: the Python API, train_topk_sae(..., targets=, "
                                                       "transcode=True). With --on-decoder: the output subfolder "
                                                       "(default: the base's hookpoint)."),
    corpus: str = typer.Option("builtin", help="Training corpus (same sources as extract)."),
    n_tokens: int = typer.Option(100_000, help="Training tokens."),
    n_latents: Optional[int] = typer.Option(None, min=1, help="Dictionary size (default 2048; with --on-decoder: "
                                                              "the base's units / 16)."),
    k: Optional[int] = typer.Option(None, min=1, help="Active latents per token (TopK; default 32, with "
                                                      "--on-decoder 4)."),
    out: Path = typer.Option(Path("runs/sae"), help="Output folder (sparsify format: <out>/<hookpoint>/)."),
    steps: int = typer.Option(1000, help="Optimizer steps (batches of 256 activations or decoder rows)."),
    lr: Optional[float] = typer.Option(None, min=0.0, help="Adam learning rate (default: 2e-4 / sqrt(n_latents / "
                                                           "16384), sparsify's)."),
    seed: int = typer.Option(0, help="Seed."),
    device: Optional[str] = typer.Option(None, help="Device."),
    threads: Optional[int] = typer.Option(None, min=1, help="Torch threads while training (default: torch's); "
                                                            "small dictionaries train several times faster on 1."),
    on_decoder: Optional[str] = typer.Option(None, "--on-decoder", help="Train a meta-dictionary instead: on this "
                                             "dictionary's unit-norm decoder rows (a checkpoint folder/file, a hub id "
                                             "or builtin:demo), not on activations; writes meta.json beside the "
                                             "checkpoint naming the base (see `autointerp meta-members`)."),
):
    """Train a small TopK SAE (sparsify format) — a real dictionary for offline demos and tests — or, with
    --on-decoder, a meta-dictionary on another dictionary's decoder rows."""
    if on_decoder is not None:
        _train_meta(on_decoder, model, hookpoint, n_latents, k, out, steps, lr, seed, device, threads)
        return
    hookpoint, n_latents, k = hookpoint or "resid_post.15", n_latents or 2048, k or 32
    from .activations import collect_activations
    from .corpus import CorpusSpec
    from .subject import load_subject
    from .train_sae import train_topk_sae

    subject = load_subject(model, device=device)
    acts = collect_activations(subject, hookpoint, CorpusSpec(source=corpus, n_tokens=n_tokens, seed=seed))
    result = train_topk_sae(acts, n_latents=n_latents, k=k, out_dir=out, hookpoint=hookpoint, seed=seed,
                            steps=steps, lr=lr, num_threads=threads, progress=True)
    typer.echo(f"wrote {result.path}: FVU {result.fvu:.3f}, dead {result.dead_fraction:.1%}, {result.steps} steps")


def _train_meta(spec: str, model: str, folder: Optional[str], n_latents: Optional[int], k: Optional[int], out: Path,
                steps: int, lr: Optional[float], seed: int, device: Optional[str], threads: Optional[int]) -> None:
    from .dictionaries import as_units, load_dictionary
    from .meta import train_meta_dictionary

    if spec == "builtin:demo":  # the only spec that needs the subject model (to train the demo SAE once)
        from .subject import load_subject

        spec = _resolve_dictionary(spec, load_subject(model, device=device))
    base = load_dictionary(spec)
    n_units = as_units(base).n_latents
    k = k or 4
    n_latents = n_latents or max(k, n_units // 16)
    r = train_meta_dictionary(base, n_latents, k, out_dir=out, folder=folder, steps=steps, lr=lr, seed=seed,
                              num_threads=threads, progress=True)
    typer.echo(f"wrote {r.path}: meta-dictionary {n_latents}x k={k} on {n_units} decoder rows of {base.id}; "
               f"FVU {r.fvu:.3f}, dead {r.dead_fraction:.1%}, {r.steps} steps")


@app.command("meta-members")
@_friendly
def meta_members_cmd(
    meta: Path = typer.Argument(..., help="A meta-dictionary folder (what train-sae --on-decoder wrote, or its "
                                          "parent)."),
    base: Optional[str] = typer.Option(None, "--base", help="The base dictionary (default: the one meta.json "
                                                            "names)."),
    top: int = typer.Option(10, min=1, help="Base latents shown per meta-latent (largest activation first)."),
    latents: Optional[str] = typer.Option(None, help="Meta-latents to show, e.g. 0-9,12 (default: all)."),
    store: bool = typer.Option(False, "--store", help="Show each base latent's explanation from the store (the "
                                                      "base dictionary's extraction)."),
    store_dictionary: Optional[str] = typer.Option(None, help="The store's dictionary holding the base's "
                                                   "explanations: name, key or id (implies --store; default: the "
                                                   "one extracted from the base checkpoint)."),
    explainer: Optional[str] = typer.Option(None, help="Explanations of this explainer kind (default: the newest "
                                                       "that is not a baseline)."),
    save: bool = typer.Option(False, "--save", help="Store the member lists as an analysis of the base dictionary "
                                                    "(implies --store): its page /analyses/{id} lists each "
                                                    "meta-latent's base latents with their explanations; and "
                                                    "register the meta-dictionary, so `interpret` explains it."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
):
    """Per meta-latent, the base latents it fires on (their unit-norm decoder rows), with their explanations."""
    from .dictionaries import load_dictionary
    from .errors import ConfigError
    from .jobs.selection import parse_latents
    from .meta import base_rows, load_meta_dictionary, meta_members, store_dictionary_for, unit_explanations
    from .units import unit_label

    md, info = load_meta_dictionary(meta)
    b = load_dictionary(base or info["base"]["source"])
    rows = base_rows(b)
    if rows.shape[1] != md.d_in:
        raise ConfigError(f"--base {b.id}: decoder rows of width {rows.shape[1]}, the meta-dictionary reads {md.d_in}")
    shown = parse_latents(latents, range(md.n_latents), md.n_latents) if latents else list(range(md.n_latents))
    every = meta_members(md, rows)
    members = [m[:top] for m in every]
    texts: dict[int, str] = {}
    if store or store_dictionary or save:
        from .store import open_store

        st = open_store()
        row = store_dictionary_for(st, {"id": b.id, "hookpoint": b.hookpoint}, store_dictionary)
        texts = unit_explanations(st, row["id"], [i for j in shown for i, _ in members[j]], explainer)
        if save:
            from .meta import save_meta_analysis

            from .meta import register_meta_dictionary

            aid = save_meta_analysis(st, row["id"], meta, info, every)
            m_row = register_meta_dictionary(st, row, info["path"], info, every, aid, rows.shape[0])
            typer.echo(f"stored as analysis {aid} of {row['name']} (/analyses/{aid}) and as dictionary "
                       f"{m_row['name']}; explain its latents with: autointerp interpret {m_row['name']} "
                       f"--latents all --scorers embedding", err=as_json)
    if as_json:
        typer.echo(json.dumps([{"meta_latent": j, "n_members": len(every[j]), "members": [
            {"unit": i, "label": unit_label(i, rows.shape[0], b.signed), "activation": a,
             "explanation": texts.get(i)} for i, a in members[j]]} for j in shown], indent=1))
        return
    typer.echo(f"{md.n_latents} meta-latents on {rows.shape[0]} decoder rows of {b.id}")
    for j in shown:
        typer.echo(f"meta #{j}: fires on {len(every[j])} base latents" + (f", top {top}:" if every[j] else ""))
        for i, a in members[j]:
            text = f"  {texts[i][:100]}" if i in texts else ""
            typer.echo(f"  {unit_label(i, rows.shape[0], b.signed):>8} {a:7.3f}{text}")


@app.command("fit-snmf")
@_friendly
def fit_snmf(
    model: str = typer.Option("builtin:smollm2", help="Subject model."),
    hookpoint: str = typer.Option("mlp_neurons.5", help="MLP hidden units to factor (mlp_neurons.N)."),
    corpus: str = typer.Option("builtin", help="Corpus (same sources as extract)."),
    n_tokens: int = typer.Option(8192, help="Tokens to fit on (activations are held in memory)."),
    ctx_len: int = typer.Option(64, help="Window length in tokens."),
    k: int = typer.Option(64, min=1, help="Features (columns of F)."),
    n_iter: int = typer.Option(50, min=0, help="Multiplicative updates."),
    out: Path = typer.Option(Path("runs/snmf"), help="Output folder (snmf.safetensors + cfg.json)."),
    cache: Optional[Path] = typer.Option(None, help="Also publish the fitted codes G as a latent cache here."),
    seed: int = typer.Option(0, help="Seed (corpus order and initialisation)."),
    device: Optional[str] = typer.Option(None, help="Device."),
):
    """Fit SNMF features (F mixed-sign, codes G >= 0) of MLP activations; load the folder as a dictionary."""
    from .corpus import CorpusSpec
    from .snmf_fit import fit_snmf_folder
    from .subject import load_subject

    subject = load_subject(model, device=device)
    spec = CorpusSpec(source=corpus, n_tokens=n_tokens, ctx_len=ctx_len, seed=seed)
    path = fit_snmf_folder(subject, hookpoint, spec, out, k=k, n_iter=n_iter, seed=seed)
    typer.echo(f"wrote {path}")
    if cache is not None:
        from .snmf_import import import_snmf_codes

        c = import_snmf_codes(path, cache, seed=seed, subject=subject)
        typer.echo(f"wrote {c.path}: {c.n_latents} features over {c.n_tokens} tokens")


def _spec_options(explainer, explainer_model, judge_model, scorers, seed, concurrency, llm_concurrency, prices,
                  hard_negatives, batch_size, scorer_option, prompt_dir, llm_timeout, llm_retries, budget) -> dict:
    """The JobSpec fields the interpret-like commands share (CLI flags -> data)."""
    from .errors import ConfigError

    names = [n.strip() for n in scorers.split(",") if n.strip()]
    if prompt_dir is not None and not prompt_dir.is_dir():
        raise ConfigError(f"--prompt-dir {prompt_dir}: not a folder")
    if budget is not None and budget < 0:
        raise ConfigError(f"--budget {budget}: expected a number of dollars >= 0")
    return {"explainer": explainer, "explainer_model": explainer_model, "judge_model": judge_model, "scorers": names,
            "scorer_options": _parse_scorer_options(list(scorer_option or []), batch_size, names), "seed": seed,
            "hard_negatives": hard_negatives, "prompt_dir": str(prompt_dir) if prompt_dir else None,
            "concurrency": concurrency, "budget_usd": budget,
            "llm": {"concurrency": llm_concurrency, "prices": str(prices) if prices else None,
                    "timeout_s": llm_timeout, "max_retries": llm_retries}}


def _run_job(store, spec, progress: bool, out: Path | None):
    """submit → (failed items of a re-run get another try) → run embedded → export; returns (job id, summary)."""
    from .jobs import retry_failed, run, submit
    from .jobs.export import export_rows, write_jsonl

    job_id = submit(store, spec)
    if store.job(job_id)["status"] in ("failed", "stopped", "budget_exhausted", "cancelled"):
        retry_failed(store, job_id)  # re-running a command is how a user retries (as before the store)
    summary = run(store, job_id, progress=progress)
    if out is not None:
        write_jsonl(export_rows(store, job_id=job_id), out)
    return job_id, summary


def _print_job_result(store, job_id: int, summary, out: Path | None) -> None:
    """The run's result (JobSummary.text) on stdout; its first errors and what to do next on stderr, exit 1 unless
    the job is done."""
    typer.echo(summary.text(store, out))
    for e in summary.errors[:5]:
        typer.echo(f"  {e}", err=True)
    if summary.status == "budget_exhausted":
        typer.echo(f"budget reached: raise it with `autointerp job resume {job_id} --budget USD`", err=True)
    if summary.status != "done":
        hint = f" (retry: autointerp job retry {job_id})" if summary.latents_failed else ""
        typer.echo(f"error: job {job_id} ended {summary.status}{hint}", err=True)
        raise typer.Exit(1)


_LATENTS_HELP = "Latents: '0-99,120' or 'all' (alive ones). Default: the first --n-latents alive ones."


@app.command()
@_friendly
def interpret(
    cache: Path = typer.Argument(..., help="A cache folder written by `autointerp extract` (registered in the store "
                                           "if it is not yet), or a store dictionary's name, e.g. a meta-dictionary "
                                           "registered by `meta-members --save`."),
    latents: Optional[str] = typer.Option(None, help=_LATENTS_HELP),
    n_latents: int = typer.Option(20, min=1, help="How many alive latents when --latents is not given."),
    explainer: str = typer.Option("default", help="Explainer kind: default, activations, cot, contrastive, "
                                                  "token_frequency, random; meta for a meta-dictionary (where "
                                                  "default means meta)."),
    explainer_model: str = typer.Option("local", help="LLM spec: local, local:MODEL, openai:MODEL, "
                                                      "openai:MODEL@http://host:port/v1."),
    judge_model: Optional[str] = typer.Option(None, help="Judge LLM spec for the scorers (default: the explainer's)."),
    scorers: str = typer.Option("detection,fuzzing", help="Comma-separated: detection, fuzzing, intruder, "
                                                          "simulation, embedding, surprisal, intervention."),
    out: Optional[Path] = typer.Option(None, help="Also export this job's rows as JSON lines to this file."),
    seed: int = typer.Option(0, help="Sampling seed (recorded with every row)."),
    concurrency: int = typer.Option(16, min=1, help="Latents in flight (the job spec's default)."),
    llm_concurrency: int = typer.Option(32, min=1, help="Requests in flight per LLM endpoint."),
    llm_timeout: float = typer.Option(60.0, min=0.1, help="Seconds per LLM request before it counts as a timeout."),
    llm_retries: int = typer.Option(5, min=0, help="Retries of a transient LLM failure (429, 5xx, timeout)."),
    prices: Optional[Path] = typer.Option(None, help="Price table (JSON/TOML: model -> $ per 1M prompt/completion tokens)."),
    hard_negatives: bool = typer.Option(True, help="Embed the random pool once (saved beside the cache) to pick hard "
                                                   "negatives."),
    batch_size: Optional[int] = typer.Option(None, min=1, help="Examples per judge call for detection and fuzzing "
                                             "(default 20: keeps explain + detection + fuzzing within 10 calls per "
                                             "latent; the reference method uses 10)."),
    scorer_option: Optional[List[str]] = typer.Option(None, "--scorer-option", "-o",
                                                      help="SCORER.FIELD=VALUE (repeatable), a field of the scorer's "
                                                           "Config; VALUE is JSON or a string, e.g. "
                                                           "intervention.strengths=[0.5,1], simulation.mode=json."),
    prompt_dir: Optional[Path] = typer.Option(None, help="Folder of prompt templates (<name>.md) replacing the "
                                                          "packaged ones for the explainer and every scorer."),
    budget: Optional[float] = typer.Option(None, help="Stop scheduling LLM work once this many dollars are spent."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
):
    """Explain and score latents of a cache into the store (a job run in this process; re-running the same
    command resumes it and retries its failed latents)."""
    from .store import open_store

    spec = {"dictionary": str(cache), "latents": latents, "n_latents": n_latents,
            **_spec_options(explainer, explainer_model, judge_model, scorers, seed, concurrency, llm_concurrency,
                            prices, hard_negatives, batch_size, scorer_option, prompt_dir, llm_timeout, llm_retries,
                            budget)}
    store = open_store()
    job_id, summary = _run_job(store, spec, progress, out)
    _print_job_result(store, job_id, summary, out)


def _cache_folder(ref: str):
    """The LatentCache of a folder, or of a store dictionary (by name, key or id) whose folder is on this machine."""
    from .cache import LatentCache
    from .errors import ConfigError
    from .store import open_store
    from .store.examples import open_examples

    if Path(ref).expanduser().exists():
        return LatentCache(Path(ref).expanduser())
    store = open_store()
    d = store.dictionary(ref)
    c = open_examples(d, store)
    if not isinstance(c, LatentCache):
        raise ConfigError(f"dictionary {d['name']}: its cache folder {d.get('cache_path')} is not on this machine "
                          f"(its examples are on its page: `autointerp serve`, /d/{d['name']})")
    return c


@app.command()
@_friendly
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="Where the demo writes its caches and plot."),
    n_tokens: int = typer.Option(60_000, min=1000, help="Tokens to extract over."),
    n_latents: int = typer.Option(8, min=1, help="Latents to explain with the LLM and score."),
    explainer_model: str = typer.Option("local", help="Explainer LLM: local (SmolLM2-135M-Instruct, in-process) or "
                                                      "openai:MODEL@URL (any OpenAI-compatible server)."),
    judge_model: Optional[str] = typer.Option(None, help="Judge LLM for the scorers (default: the explainer's)."),
    serve_page: bool = typer.Option(True, "--serve/--no-serve", help="Serve the API and web page until Ctrl-C "
                                    "(--no-serve: end after the summary, for scripts)."),
    host: str = typer.Option("127.0.0.1", help="Where to serve."),
    port: int = typer.Option(8000, help="Port to serve on."),
    progress: bool = typer.Option(True, help="Progress bars."),
):
    """The main job, offline: SmolLM2 + two small SAEs (shipped, or trained here once) → extraction → LLM
    explanations scored by detection, fuzzing and embedding beside two baselines → store → search → comparison →
    web page."""
    from .demo import demo_summary_text, run_demo

    r = run_demo(out, n_tokens=n_tokens, n_latents=n_latents, explainer_model=explainer_model,
                 judge_model=judge_model, echo=typer.echo, progress=progress)
    typer.echo(demo_summary_text(r))
    typer.echo(f"\n[demo] done in {r['elapsed_s']:.0f} s; store: {r['store']!r}")
    if serve_page:  # the `serve` command: prints the URL, serves until Ctrl-C
        serve(host=host, port=port, database_url=None, read_key=False, cors_origin=[], run_jobs=True, device=None)


# ----------------------------------------------------------------------------------------------- store and jobs

job_app = typer.Typer(no_args_is_help=True, help="Queue, watch and control explanation jobs (the store keeps them).")
app.add_typer(job_app, name="job")
db_app = typer.Typer(no_args_is_help=True, help="The SQL store: schema migrations.")
app.add_typer(db_app, name="db")


def _load_spec_file(path: Path) -> dict:
    from .errors import ConfigError

    if not path.is_file():
        raise ConfigError(f"{path}: no such job spec file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object (a job spec)")
    return data


@app.command("run")
@_friendly
def run_spec(
    spec_file: Path = typer.Argument(..., help="A job spec (JSON): see `autointerp job schema`."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
    out: Optional[Path] = typer.Option(None, help="Also export the job's rows as JSON lines."),
):
    """Run a job spec in this process (the embedded runner: no broker, no server)."""
    from .store import open_store

    store = open_store()
    job_id, summary = _run_job(store, _load_spec_file(spec_file), progress, out)
    _print_job_result(store, job_id, summary, out)


@job_app.command("submit")
@_friendly
def job_submit(spec_file: Path = typer.Argument(..., help="A job spec (JSON).")):
    """Validate a spec and queue its job (prints the job id). Workers or `autointerp job run ID` execute it."""
    from .jobs import submit
    from .store import open_store

    typer.echo(submit(open_store(), _load_spec_file(spec_file)))


@job_app.command("run")
@_friendly
def job_run(job_id: int = typer.Argument(...), progress: bool = typer.Option(True, help="Show a progress bar.")):
    """Run a queued job's pending items in this process."""
    from .jobs import run
    from .store import open_store

    store = open_store()
    summary = run(store, job_id, progress=progress)
    _print_job_result(store, job_id, summary, None)


@job_app.command("status")
@_friendly
def job_status(job_id: int = typer.Argument(...), as_json: bool = typer.Option(False, "--json"),
               watch: bool = typer.Option(False, help="Refresh every 2 s until the job ends.")):
    """Counts per stage, spend, throughput and ETA."""
    import time

    from .jobs import status
    from .store import open_store

    store = open_store()
    while True:
        st = status(store, job_id)
        typer.echo(json.dumps(st.as_dict(), default=str, indent=1) if as_json else st.text())
        if not watch or st.status in ("done", "failed", "stopped", "cancelled", "budget_exhausted"):
            return
        time.sleep(2)


@job_app.command("list")
@_friendly
def job_list(limit: int = typer.Option(20, min=1)):
    """Recent jobs."""
    from .store import open_store

    for j in open_store().jobs(limit):
        what = j["spec"].get("dictionary") or f"extract {(j['spec'].get('extraction') or {}).get('dictionary')}"
        typer.echo(f"{j['id']:>5} {j['status']:<17} {j['created']:%Y-%m-%d %H:%M} {what} "
                   f"{j['spec'].get('explainer')}:{j['spec'].get('explainer_model')} {','.join(j['spec'].get('scorers', []))}")


@job_app.command("cancel")
@_friendly
def job_cancel(job_id: int = typer.Argument(...)):
    """Stop scheduling a job's work (runners stop after their latents in flight)."""
    from .jobs import cancel
    from .store import open_store

    cancel(open_store(), job_id)
    typer.echo(f"job {job_id} cancelled")


@job_app.command("resume")
@_friendly
def job_resume(job_id: int = typer.Argument(...),
               budget: Optional[float] = typer.Option(None, help="A new budget in dollars.")):
    """Make a cancelled, stopped or budget-limited job runnable again."""
    from .jobs import resume
    from .store import open_store

    resume(open_store(), job_id, budget)
    typer.echo(f"job {job_id} resumed: run it with `autointerp job run {job_id}` or let workers take it")


@job_app.command("retry")
@_friendly
def job_retry(job_id: int = typer.Argument(...)):
    """Put a job's failed items back in the queue."""
    from .jobs import retry_failed
    from .store import open_store

    typer.echo(f"job {job_id}: {retry_failed(open_store(), job_id)} failed items queued again")


@job_app.command("schema")
def job_schema():
    """The JSON schema of a job spec."""
    from .jobs import JobSpec

    typer.echo(json.dumps(JobSpec.model_json_schema(), indent=1))


@db_app.command("upgrade")
@_friendly
def db_upgrade(url: Optional[str] = typer.Option(None, help="Database URL (default: $AUTOINTERP_DATABASE_URL or "
                                                            "the SQLite file under the cache folder).")):
    """Bring the store's schema to this version of autointerp (Alembic migrations in db/)."""
    from .store import resolve_url, upgrade

    before, after = upgrade(url)
    typer.echo(f"{resolve_url(url)}: schema {before or 'empty'} -> {after}")


@app.command("import")
@_friendly
def import_results(
    path: Path = typer.Argument(..., help="A results.jsonl (from before the store, or an export)."),
    dictionary: Optional[str] = typer.Option(None, help="The cache folder (or store name) the rows belong to; "
                                                         "default: the dictionary each row names."),
):
    """Import JSON-lines results into the store (all rows or none; importing twice adds nothing)."""
    from .jobs.export import import_jsonl
    from .store import open_store

    counts = import_jsonl(open_store(), path, dictionary)
    typer.echo(f"imported {counts['explanations']} explanations and {counts['scores']} scores from {path}")


@app.command("export")
@_friendly
def export_results(
    out: Path = typer.Argument(..., help="Output .jsonl file."),
    dictionary: Optional[str] = typer.Option(None, help="Only this dictionary (name, key or cache folder)."),
    job: Optional[int] = typer.Option(None, help="Only this job's results and usage."),
):
    """Export the store's rows as JSON lines (explanations, scores, per-latent usage, job totals)."""
    from .jobs.export import export_rows, write_jsonl
    from .store import open_store

    n = write_jsonl(export_rows(open_store(), dictionary, job), out)
    typer.echo(f"wrote {n} rows to {out}")


@job_app.command("watch")
@_friendly
def job_watch(job_id: int = typer.Argument(...),
              interval: float = typer.Option(2.0, min=0.1, help="Seconds between refreshes.")):
    """Live progress bars per stage (done / skipped / failed of all latents) with spend, until the job ends; then
    its status. Exit 1 when it ended failed, stopped, cancelled or over budget."""
    import time

    from tqdm import tqdm

    from .jobs import status
    from .store import open_store

    store = open_store()
    st = status(store, job_id)
    bars = {stage: tqdm(total=sum(c.values()), desc=f"{stage:<18}", unit="latent", position=i, leave=True,
                        dynamic_ncols=True) for i, (stage, c) in enumerate(sorted(st.stages.items()))}
    final = ("done", "failed", "stopped", "cancelled", "budget_exhausted")
    try:
        while True:
            for stage, bar in bars.items():
                c = st.stages.get(stage, {})
                bar.n = c.get("done", 0) + c.get("skipped", 0) + c.get("failed", 0)
                bar.set_postfix_str(f"running {c.get('running', 0)} failed {c.get('failed', 0)} "
                                    f"${st.spend['cost_usd']:.4f}", refresh=False)
                bar.refresh()
            if st.status in final:
                break
            time.sleep(interval)
            st = status(store, job_id)
    finally:
        for bar in bars.values():
            bar.close()
    typer.echo(st.text())
    if st.status != "done":
        typer.echo(f"error: job {job_id} ended {st.status}", err=True)
        raise typer.Exit(1)


def worker_threads(cpus: int, concurrency: int, pool: str, env) -> int | None:
    """CPU threads per worker process: the cores shared out between the pool's processes (two processes with a
    thread per core each ran a sharded extraction at 0.70x one process, one thread each at 1.88x: docs/benchmarks.md),
    unless OMP_NUM_THREADS is set; None for a threads/solo pool (one process)."""
    if "OMP_NUM_THREADS" in env or pool != "prefork":
        return None
    return max(1, cpus // concurrency)


@app.command("worker")
@_friendly
def worker(
    queues: str = typer.Option("llm,cpu", help="Comma-separated queues to consume: gpu (intervention, "
                                                "surprisal), llm (explain, detection, fuzzing, …), cpu (embedding)."),
    concurrency: int = typer.Option(1, min=1, help="Worker processes; each keeps its job's `concurrency` latents "
                                                   "(and many LLM requests) in flight."),
    pool: str = typer.Option("prefork", help="Celery pool: prefork, threads or solo."),
    hostname: Optional[str] = typer.Option(None, help="Node name (default QUEUES.PID@HOST)."),
    dispatch: bool = typer.Option(True, help="Run the dispatcher thread: it feeds the queues from the store, sweeps "
                                             "expired leases and finishes jobs (safe to run in every worker)."),
    loglevel: str = typer.Option("INFO", help="Celery log level."),
):
    """A Celery worker (broker $AUTOINTERP_BROKER_URL, store $AUTOINTERP_DATABASE_URL): it runs the jobs that
    `autointerp job submit` queues. Flower works against it (`celery -A autointerp.jobs.celery_app flower`)."""
    from .errors import ConfigError
    from .jobs.dispatch import QUEUES, WorkerSettings

    names = [q.strip() for q in queues.split(",") if q.strip()]
    bad = [q for q in names if q not in QUEUES]
    if bad or not names:
        raise ConfigError(f"--queues {queues!r}: expected a comma-separated subset of {', '.join(QUEUES)}")
    if pool not in ("prefork", "threads", "solo"):
        raise ConfigError(f"--pool {pool!r}: expected prefork, threads or solo")
    if not dispatch:
        os.environ["AUTOINTERP_DISPATCH"] = "0"
    settings = WorkerSettings.from_env()  # a bad setting fails here, with one line
    threads = worker_threads(os.cpu_count() or 1, concurrency, pool, os.environ)
    if threads is not None:  # read by torch when a pool process imports it
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    from .jobs.celery_app import app as celery_app

    name = hostname or f"{'-'.join(names)}.{os.getpid()}@%h"
    celery_app.worker_main(["worker", "-Q", ",".join(settings.queue(q) for q in names), "-c", str(concurrency),
                            "-P", pool, "-l", loglevel, "-n", name, "--without-gossip", "--without-mingle"])


@app.command("search")
@_friendly
def search_cmd(
    query: str = typer.Argument(..., help="What the latents should be about, in words."),
    k: int = typer.Option(20, "-k", min=1, max=1000, help="Results."),
    keyword: bool = typer.Option(False, "--keyword", help="Match words (full-text) instead of meaning."),
    dictionary: Optional[str] = typer.Option(None, help="Only this dictionary (name, key or cache folder)."),
    subject_model: Optional[str] = typer.Option(None, help="Only dictionaries of this subject model."),
    hookpoint: Optional[str] = typer.Option(None, help="Only this hookpoint."),
    explainer: Optional[str] = typer.Option(None, help="Only explanations of this explainer kind."),
    scorer: Optional[str] = typer.Option(None, help="With --min-score: the scorer whose score is filtered."),
    min_score: Optional[float] = typer.Option(None, help="Minimum headline score by --scorer."),
    min_frequency: Optional[float] = typer.Option(None, help="Minimum firing frequency."),
    max_frequency: Optional[float] = typer.Option(None, help="Maximum firing frequency."),
    head: Optional[int] = typer.Option(None, min=0, help="attn_z dictionaries: latents living mostly in this "
                                                          "attention head (largest decoder-norm share)."),
    max_random_rate: Optional[float] = typer.Option(None, min=0.0, max=1.0, help="Only latents whose firing rate on "
                                                    "random-token sequences (autointerp random-rate) is at most "
                                                    "this: LangFIR's filter of language-agnostic latents."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
):
    """Search explanations across every dictionary in the store (semantic by default)."""
    from .search import SearchFilters, embed_explanations, search
    from .store import open_store

    store = open_store()
    f = SearchFilters(dictionary, subject_model, hookpoint, explainer, scorer, min_score, min_frequency, max_frequency,
                      head, max_random_rate)
    if not keyword:
        embed_explanations(store, progress=True)  # the ones not embedded yet (none, after the first search)
    hits = search(store, query, k, "keyword" if keyword else "semantic", f)
    if as_json:
        typer.echo(json.dumps([h.as_dict() for h in hits], indent=1))
        return
    if not hits:
        typer.echo("no match")
        raise typer.Exit(1)
    typer.echo(f"{'sim':>6} {'dictionary':<24} {'latent':>7} {'freq':>9}  {'scores':<26} explanation")
    for h in hits:
        sc = " ".join(f"{k[:4]}={v:.2f}" for k, v in sorted(h.scores.items()) if v is not None)
        sim = "" if h.similarity is None else f"{h.similarity:.3f}"
        freq = "" if h.frequency is None else f"{h.frequency:.2e}"
        typer.echo(f"{sim:>6} {h.dictionary[:24]:<24} {h.latent:>7} {freq:>9}  {sc[:26]:<26} {h.text[:80]}")


apikey_app = typer.Typer(no_args_is_help=True, help="API keys for the HTTP API's writes, jobs, steering and activations.")
app.add_typer(apikey_app, name="apikey")


@apikey_app.command("create")
@_friendly
def apikey_create(name: str = typer.Argument(..., help="Who or what the key is for (shown in `apikey list`).")):
    """Make a new API key and print it once (the store keeps only its sha256 hash)."""
    import secrets

    from .store import open_store

    if not name.strip() or len(name) > 200:
        from .errors import ConfigError

        raise ConfigError("apikey name: expected 1 to 200 characters")
    key = "ai_" + secrets.token_urlsafe(32)
    open_store().create_api_key(name.strip(), key)
    typer.echo(key)
    typer.echo("(shown once: the store keeps only its hash; send it as the X-API-Key header)", err=True)


@apikey_app.command("list")
@_friendly
def apikey_list():
    """The store's API keys (ids, names, dates; never the keys)."""
    from .store import open_store
    from .store.queries import api_keys

    for k in api_keys(open_store()):
        typer.echo(f"{k['id']:>4}  {k['name']:<30} {k['created']:%Y-%m-%d %H:%M}  {'revoked' if k['revoked'] else 'active'}")


@apikey_app.command("revoke")
@_friendly
def apikey_revoke(key_id: int = typer.Argument(..., help="The id `apikey list` shows.")):
    """Revoke an API key (at once for new servers; a running server forgets it within a minute)."""
    from .errors import ConfigError
    from .store import open_store
    from .store.queries import revoke_api_key

    if not revoke_api_key(open_store(), key_id):
        raise ConfigError(f"api key {key_id}: no such key (autointerp apikey list)")
    typer.echo(f"revoked key {key_id}")


@app.command("serve")
@_friendly
def serve(
    host: str = typer.Option("127.0.0.1", help="Interface to listen on (0.0.0.0 exposes it to the network)."),
    port: int = typer.Option(8000, min=0, max=65535, help="Port (0: any free port)."),
    database_url: Optional[str] = typer.Option(None, help="Store URL (default: $AUTOINTERP_DATABASE_URL or the "
                                                          "SQLite file under the cache folder)."),
    read_key: bool = typer.Option(False, "--read-key", help="Require an API key for reads too."),
    cors_origin: List[str] = typer.Option([], help="Allow this browser origin (repeat; default: none, CORS closed)."),
    run_jobs: bool = typer.Option(True, help="Run jobs submitted through the API in this process (else Celery "
                                             "workers run them)."),
    device: Optional[str] = typer.Option(None, help="Device of the subject model for /activations and /steer."),
    workers: int = typer.Option(1, min=1, max=64, help="Server processes (each with its own store connections)."),
):
    """Serve the HTTP API (/api/v1, OpenAPI at /api/v1/docs) and the web pages; prints the URL."""
    import socket

    import uvicorn

    from .api import Settings, create_app

    settings = Settings(database_url=database_url, read_key_required=read_key, cors_origins=list(cors_origin),
                        embedded_runner=run_jobs, device=device)
    app_ = create_app(settings)  # opens the store: a bad URL fails here, with one line
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        from .errors import ConfigError

        raise ConfigError(f"serve: cannot listen on {host}:{port} ({e.strerror})") from None
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = f"http://{'[' + shown + ']' if ':' in shown else shown}:{sock.getsockname()[1]}"
    typer.echo(f"autointerp serving {url}  (API {url}/api/v1/docs; store {app_.state.store!r}; Ctrl-C stops)")
    workers = workers if isinstance(workers, int) else 1  # called as a function (the demo) without it
    if workers == 1:
        uvicorn.Server(uvicorn.Config(app_, log_level="warning")).run(sockets=[sock])
        return
    # several processes: each builds the app from the environment (the same settings, passed on)
    os.environ.update({"AUTOINTERP_DATABASE_URL": app_.state.store.url, "AUTOINTERP_API_READ_KEY": str(int(read_key)),
                       "AUTOINTERP_API_CORS_ORIGINS": ",".join(cors_origin), "AUTOINTERP_API_RUN_JOBS":
                       str(int(run_jobs)), **({"AUTOINTERP_API_DEVICE": device} if device else {})})
    # by host and port, not fd=: uvicorn reopens an fd as a Unix socket, and the accepted TCP connections then lack
    # TCP_NODELAY (each response's second write waited ~40 ms for the client's delayed ACK)
    bound = sock.getsockname()[1]
    sock.close()
    uvicorn.run("autointerp.api.app:create_app", factory=True, host=host, port=bound, workers=workers,
                log_level="warning")


@app.command("export-neuronpedia")
@_friendly
def export_neuronpedia_cmd(
    out: Path = typer.Argument(..., help="Output folder; files go to OUT/{modelId}/{source}/…"),
    dictionary: str = typer.Option(..., "--dictionary", "-d", help="Dictionary (name, key or cache folder)."),
    model_id: Optional[str] = typer.Option(None, help="Neuronpedia modelId (default: from the subject model)."),
    source_id: Optional[str] = typer.Option(None, help="Neuronpedia source id (default: LAYER-NAME)."),
):
    """Export a dictionary in Neuronpedia's dataset layout (features, explanations, activations as
    batch-N.jsonl.gz)."""
    from .exports import export_neuronpedia
    from .store import open_store

    root = export_neuronpedia(open_store(), dictionary, out, model_id=model_id, source_id=source_id)
    typer.echo(f"wrote {root}")


@app.command("export-delphi")
@_friendly
def export_delphi_cmd(
    out: Path = typer.Argument(..., help="Output folder (explanations/, scores/SCORER/, run_config.json)."),
    dictionary: str = typer.Option(..., "--dictionary", "-d", help="Dictionary (name, key or cache folder)."),
    explainer: Optional[str] = typer.Option(None, help="Only this explainer's explanations (default: the newest "
                                                       "LLM explanation per latent)."),
):
    """Export a dictionary as a delphi result folder."""
    from .exports import export_delphi
    from .store import open_store

    typer.echo(f"wrote {export_delphi(open_store(), dictionary, out, explainer=explainer)}")


@app.command("export-parquet")
@_friendly
def export_parquet_cmd(
    out: Path = typer.Argument(..., help="Output folder (latents/explanations/scores .parquet)."),
    dictionary: str = typer.Option(..., "--dictionary", "-d", help="Dictionary (name, key or cache folder)."),
):
    """Dump a dictionary's latents, explanations and scores as parquet tables (for notebooks)."""
    from .exports import export_parquet
    from .store import open_store

    typer.echo(f"wrote {export_parquet(open_store(), dictionary, out)}")


@app.command("import-delphi")
@_friendly
def import_delphi_cmd(
    folder: Path = typer.Argument(..., help="A delphi result folder (with explanations/ and scores/)."),
    dictionary: str = typer.Option(..., "--dictionary", "-d", help="The dictionary the latents belong to (store "
                                                                   "name/key, or its cache folder)."),
    module: Optional[str] = typer.Option(None, help="Which module's files, when the run covered several."),
    explainer_model: Optional[str] = typer.Option(None, help="The explainer model (default: run_config.json's)."),
):
    """Import a delphi result folder into the store (searchable and comparable like our own results)."""
    from .exports import import_delphi
    from .store import open_store

    c = import_delphi(open_store(), folder, dictionary, explainer_model=explainer_model, module=module)
    typer.echo(f"imported {c['explanations']} explanations and {c['scores']} scores from {folder}")


@app.command("compare")
@_friendly
def compare_cmd(
    a: str = typer.Argument(..., help="First dictionary (store name, key, id or cache folder)."),
    b: str = typer.Argument(..., help="Second dictionary."),
    method: str = typer.Option("embedding", help="embedding (explanations' meaning; any two dictionaries), decoder "
                                                 "(decoder + encoder cosine, same d_in; with different widths also "
                                                 "the wider one's novel vs reconstruction latents), activation "
                                                 "(co-activation over the shared pool windows, and linear CKA) or "
                                                 "itda-jaccard (two ITDA dictionaries: Jaccard index of their atom-"
                                                 "index sets). decoder, encoder and itda-jaccard also take two "
                                                 "checkpoints (paths or hub ids) with no extraction."),
    threshold: float = typer.Option(0.7, min=-1.0, max=1.0, help="Similarity from which a pair counts as matched."),
    show: int = typer.Option(10, min=0, help="Matched pairs to print."),
    as_json: bool = typer.Option(False, "--json", help="The stored result as JSON."),
):
    """Compare two dictionaries: a summary number, the similarity distribution, matched pairs, each side's novel
    latents (stored in the store; checkpoints compared by weights are not)."""
    from .compare import compare, compare_checkpoints, format_comparison
    from .store import open_store

    store = open_store()
    if method in ("decoder", "encoder", "itda-jaccard") and not _in_store(store, a, b):
        # weights only: straight from the two checkpoints (paths or hub ids), no extraction, nothing stored
        r = compare_checkpoints(a, b, method, threshold=threshold)
        if as_json:
            typer.echo(json.dumps(r, default=str))
            return
        typer.echo(f"{a} vs {b} by {method} (checkpoints, not stored)")
        if method == "itda-jaccard":
            o = r["result"]
            typer.echo(f"  jaccard {o['jaccard']:.4f} ({o['shared']} shared atoms of {o['union']}; "
                       f"A has {o['n_a']}, B {o['n_b']})")
            return
        for line in format_comparison(r, show):
            typer.echo(line)
        return
    r = compare(store, a, b, method, threshold=threshold)
    if as_json:
        typer.echo(json.dumps(r, default=str))
        return
    typer.echo(f"comparison {r['id']}: {a} vs {b} by {r['method']}")
    for line in format_comparison(r, show):
        typer.echo(line)


def _corpus_reader(dictionary: str, model: str, hookpoint: Optional[str], device: Optional[str]):
    """(reader, store, stored dictionary row or None): a dictionary of the store reads with the model and checkpoint
    it was extracted with (results are stored); anything else is a checkpoint read with --model (not stored)."""
    from .corpus_latents import LatentReader
    from .store import open_store

    store = open_store()
    if _in_store(store, dictionary):
        row = store.dictionary(dictionary)
        return LatentReader.from_store(store, dictionary, device), store, row
    return LatentReader.from_specs(model, dictionary, hookpoint, device), store, None


def _corpus_spec(source: str, text_column: str, split: str):
    from .corpus import CorpusSpec

    return CorpusSpec(source=source, text_column=text_column, split=split)


_D_HELP = ("Dictionary: a store name (reads with the model and checkpoint of its extraction; results are stored) or a "
           "checkpoint / neurons / topk-neurons:K read with --model at --hookpoint (results printed, not stored).")


@app.command("embed-docs")
@_friendly
def embed_docs_cmd(
    corpus: str = typer.Argument(..., help="builtin, builtin:code, a .txt/.jsonl/.parquet file or folder, or hf:NAME."),
    out: Path = typer.Option(..., "--out", "-o", help="Parquet file to write (one row per document)."),
    dictionary: str = typer.Option(..., "--dictionary", "-d", help=_D_HELP),
    model: str = typer.Option("builtin:smollm2", help="Subject model for a checkpoint that is not in the store."),
    hookpoint: Optional[str] = typer.Option(None, help="Hookpoint for a checkpoint that is not in the store."),
    max_docs: Optional[int] = typer.Option(None, min=1, help="Documents to read (default: all)."),
    max_tokens: int = typer.Option(256, min=1, help="Tokens read per document (a longer one is cut there)."),
    batch_size: int = typer.Option(16, min=1, help="Documents per forward pass."),
    text_column: str = typer.Option("text", help="Text column of .jsonl/.parquet/HF corpora."),
    split: str = typer.Option("train", help="HF dataset split."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, … (default: CUDA when present)."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
):
    """Per-document SAE embeddings of a corpus, in its file order, streamed to parquet: for each document the
    latents that fire (the binarised embedding) with their max- and mean-pooled activations and token counts."""
    from .corpus_latents import embed_docs

    reader, _, _ = _corpus_reader(dictionary, model, hookpoint, device)
    s = embed_docs(reader, _corpus_spec(corpus, text_column, split), out, max_docs=max_docs, max_tokens=max_tokens,
                   batch_size=batch_size, progress=progress)
    typer.echo(f"wrote {s['documents']} documents ({s['tokens']} tokens, {s['mean_active_latents']:.1f} active "
               f"latents per document) to {s['path']}")


@app.command("diff")
@_friendly
def diff_cmd(
    corpus_a: str = typer.Argument(..., help="Corpus A (as extract's --corpus)."),
    corpus_b: str = typer.Argument(..., help="Corpus B."),
    dictionary: str = typer.Option(..., "--dictionary", "-d", help=_D_HELP),
    model: str = typer.Option("builtin:smollm2", help="Subject model for a checkpoint that is not in the store."),
    hookpoint: Optional[str] = typer.Option(None, help="Hookpoint for a checkpoint that is not in the store."),
    max_docs: Optional[int] = typer.Option(2000, min=1, help="Documents read from each side."),
    max_tokens: int = typer.Option(256, min=1, help="Tokens read per document."),
    top: int = typer.Option(20, min=1, max=500, help="Latents reported (largest |firing-rate difference| first)."),
    alpha: float = typer.Option(0.05, min=0.0, max=1.0, help="False-discovery rate for 'significant'."),
    batch_size: int = typer.Option(16, min=1, help="Documents per forward pass."),
    text_column: str = typer.Option("text", help="Text column of .jsonl/.parquet/HF corpora."),
    split: str = typer.Option("train", help="HF dataset split."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, … (default: CUDA when present)."),
    as_json: bool = typer.Option(False, "--json", help="The result as JSON."),
    progress: bool = typer.Option(True, help="Show progress bars."),
):
    """Which latents fire in more documents of A than of B (and the reverse): ranked by firing-rate difference,
    with a two-proportion z-test and Benjamini–Hochberg q-values, each latent's explanation and its best documents
    on both sides. Stored (see /analyses) when the dictionary is in the store."""
    from .corpus_latents import Side, format_diff, run_diff

    reader, store, row = _corpus_reader(dictionary, model, hookpoint, device)
    r = run_diff(reader, Side(corpus_a, _corpus_spec(corpus_a, text_column, split)),
                 Side(corpus_b, _corpus_spec(corpus_b, text_column, split)), store=store,
                 dictionary_pk=row["id"] if row else None, max_docs=max_docs, max_tokens=max_tokens, top=top,
                 alpha=alpha, batch_size=batch_size, progress=progress)
    if as_json:
        typer.echo(json.dumps(r, default=str))
        return
    for line in format_diff(r):
        typer.echo(line)


@app.command("separability")
@_friendly
def separability_cmd(
    sources: List[str] = typer.Argument(..., help="A JSONL of {text, label} (one file), or two corpora: the "
                                                  "concept's texts, then the others."),
    dictionary: str = typer.Option(..., "--dictionary", "-d", help=_D_HELP),
    concept: Optional[str] = typer.Option(None, help="The concept's label (JSONL with more than two labels)."),
    model: str = typer.Option("builtin:smollm2", help="Subject model for a checkpoint that is not in the store."),
    hookpoint: Optional[str] = typer.Option(None, help="Hookpoint for a checkpoint that is not in the store."),
    max_docs: int = typer.Option(1000, min=1, help="Documents read from each of two corpora."),
    max_tokens: int = typer.Option(256, min=1, help="Tokens read per document."),
    top: int = typer.Option(20, min=1, max=500, help="Latents printed."),
    label_column: str = typer.Option("label", help="Label field of the JSONL."),
    text_column: str = typer.Option("text", help="Text field/column."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, … (default: CUDA when present)."),
    as_json: bool = typer.Option(False, "--json", help="The summary and top latents as JSON."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
):
    """Concept separability per latent: the Jensen–Shannon distance between the latent's max-activation
    distributions on the concept's texts and on the others (0 blind … 1 perfectly separating). Stored as the
    `separability` statistic of each latent (sortable on the latents page) when the dictionary is in the store."""
    from .corpus import iter_documents
    from .corpus_latents import format_separability, read_labelled, run_separability
    from .errors import ConfigError

    if len(sources) == 1:
        texts, labels = read_labelled(sources[0], text_column, label_column)
    elif len(sources) == 2:
        texts, labels = [], []
        for src, lab in zip(sources, ("concept", "other")):
            docs = iter_documents(_corpus_spec(src, text_column, "train"), ordered=True)
            got = [t for _, t in zip(range(max_docs), docs)]
            docs.close()
            texts += got
            labels += [lab] * len(got)
        concept = "concept"
    else:
        raise ConfigError(f"separability: expected one labelled JSONL or two corpora (got {len(sources)} arguments)")
    reader, store, row = _corpus_reader(dictionary, model, hookpoint, device)
    r = run_separability(reader, texts, labels, concept, store=store, dictionary_pk=row["id"] if row else None,
                         title=" vs ".join(sources) if len(sources) == 2 else "", max_tokens=max_tokens, top=top,
                         progress=progress)
    if as_json:
        typer.echo(json.dumps({k: r[k] for k in ("id", "summary", "rows", "params")}, default=str))
        return
    for line in format_separability(r):
        typer.echo(line)


@app.command("random-rate")
@_friendly
def random_rate_cmd(
    dictionary: str = typer.Option(..., "--dictionary", "-d", help=_D_HELP),
    model: str = typer.Option("builtin:smollm2", help="Subject model for a checkpoint that is not in the store."),
    hookpoint: Optional[str] = typer.Option(None, help="Hookpoint for a checkpoint that is not in the store."),
    sequences: int = typer.Option(256, min=1, help="Random-token sequences."),
    length: int = typer.Option(64, min=1, help="Tokens per sequence (after BOS)."),
    seed: int = typer.Option(0, help="Seed of the random tokens."),
    batch_size: int = typer.Option(16, min=1, help="Sequences per forward pass."),
    show: int = typer.Option(10, min=0, help="Latents printed (highest rates first)."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, … (default: CUDA when present)."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
):
    """Each latent's firing rate on random-token sequences (LangFIR's filter: latents that fire whatever the text
    are not about any language or topic). Stored as the `random_rate` statistic when the dictionary is in the
    store: then `search --max-random-rate`, the API's `max_random_rate` and `stat=random_rate` filter by it."""
    import numpy as np

    from .corpus_latents import run_random_rate

    reader, store, row = _corpus_reader(dictionary, model, hookpoint, device)
    r = run_random_rate(reader, store=store, dictionary_pk=row["id"] if row else None, n_seqs=sequences,
                        length=length, seed=seed, batch_size=batch_size, progress=progress)
    s = r["summary"]
    typer.echo(f"random-token firing rate over {s['positions']} positions: {s['latents_firing']} latents fire, "
               f"{s['above_1pct']} above 1 %, max {s['max']:.4f}" + ("" if r["stored"] else " (not stored)"))
    for j in np.argsort(-r["rates"], kind="stable")[:show]:
        if r["rates"][j] > 0:
            typer.echo(f"  {int(j):>7} {r['rates'][j]:.4f}")


def _in_store(store, *refs: str) -> bool:
    """Whether every ref names a dictionary of the store (else: checkpoints)."""
    from .errors import ConfigError

    try:
        for ref in refs:
            store.dictionary(ref)
    except ConfigError:
        return False
    return True


@app.command("steer")
@_friendly
def steer_cmd(
    dictionary: str = typer.Argument(..., help="Store dictionary (name, key or id) or cache folder; with --model, a "
                                               "checkpoint (folder/file, hub id, 'neurons' or 'topk-neurons:K')."),
    prompt: str = typer.Option("The most important thing is", help="Prompt to complete."),
    latent: List[int] = typer.Option(..., "--latent", "-l", help="Latent index to edit (repeatable: several at "
                                                                 "once; a signed dictionary's units are its poles)."),
    mode: List[str] = typer.Option(["add"], "--mode", help="add (the unit decoder direction × strength × value × the "
                                                         "median activation norm), clamp (the code set to strength "
                                                         "× value at every position) or ablate (the direction "
                                                         "projected out); one for all latents or one per --latent."),
    value: Optional[List[float]] = typer.Option(None, "--value", help="add: weight (default 1); clamp: the code "
                                                                    "(default 0); one for all or one per --latent."),
    strength: Optional[List[float]] = typer.Option(None, "--strength", "-s", help="Strengths (repeatable; 0 = clean). "
                                                   "Default 0 0.5 1 2 with an add edit, else 0 1."),
    max_new_tokens: int = typer.Option(24, min=1, help="Tokens to generate per completion."),
    model: Optional[str] = typer.Option(None, help="Subject model when DICTIONARY is a checkpoint (default: the "
                                                   "cache's)."),
    hookpoint: Optional[str] = typer.Option(None, help="Hookpoint of a checkpoint (default: what it names)."),
    loss_corpus: Optional[str] = typer.Option(None, help="Also print the next-token loss on this corpus (extract's "
                                                         "sources) clean and under the edits at each strength."),
    loss_tokens: int = typer.Option(4096, min=2, help="Tokens of --loss-corpus."),
    ctx_len: int = typer.Option(64, help="Window length of --loss-corpus in tokens (BOS included)."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 … (default: CUDA when present)."),
    progress: bool = typer.Option(True, help="Show a progress bar over --loss-corpus."),
):
    """Greedy completions of a prompt with latents added, clamped or ablated at each strength; with --loss-corpus
    the corpus's next-token loss clean vs edited."""
    from .corpus import CorpusSpec
    from .scorers.intervention import steer_loss, steering_target

    edits = _steer_edits(latent, mode, value or [])
    loss_spec = CorpusSpec(loss_corpus, ctx_len=ctx_len, n_tokens=loss_tokens) if loss_corpus else None
    if loss_spec:
        loss_spec.validate()
    target = steering_target(dictionary, model=model, hookpoint=hookpoint, device=device, edits=edits,
                             label="--latent")
    strengths = strength or ([0.0, 0.5, 1.0, 2.0] if any(e.mode == "add" for e in edits) else [0.0, 1.0])
    typer.echo(f"{target.hookpoint.name} (median norm {target.norm:.1f}): "
               + ", ".join(f"#{e.latent} {e.mode}" + ("" if e.mode == "ablate" else f" {e.value:g}") for e in edits))
    for row in target.sweep(prompt, edits, strengths, max_new_tokens):
        typer.echo(f"  strength {row['strength']:g}: {json.dumps(prompt + row['completion'])}")
    if loss_spec:
        loss = steer_loss(target, loss_spec, edits, [s for s in strengths if s], progress=progress)
        typer.echo(f"next-token loss on {loss_corpus} ({loss.n_tokens} tokens): clean {loss.clean:.4f}")
        for s, v in loss.intervened.items():
            typer.echo(f"  strength {s:g}: {v:.4f} ({v - loss.clean:+.4f})")


def _steer_edits(latents: list[int], modes: list[str], values: list[float]):
    """--latent/--mode/--value as edits: a mode or value given once holds for every latent."""
    from .errors import ConfigError
    from .scorers.intervention import STEER_DEFAULT_VALUE, steer_edit

    for m in modes:
        if m not in STEER_DEFAULT_VALUE:
            raise ConfigError(f"--mode {m!r}: expected one of {', '.join(STEER_DEFAULT_VALUE)}")
    for name, given in (("--mode", modes), ("--value", values)):
        if len(given) > 1 and len(given) != len(latents):
            raise ConfigError(f"{name}: give one for all latents or one per --latent ({len(latents)}), "
                              f"not {len(given)}")
    pick = lambda xs, i: (xs[i] if len(xs) > 1 else xs[0]) if xs else None  # noqa: E731
    return [steer_edit(j, pick(modes, i), pick(values, i)) for i, j in enumerate(latents)]


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
