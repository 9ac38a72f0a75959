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
    detection and fuzzing batch) -> InterpretConfig.scorer_options."""
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
    top_k: int = typer.Option(100, help="Top-activating windows kept per latent."),
    n_sample: int = typer.Option(200, help="Uniformly sampled activating windows kept per latent."),
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
):
    """Run the subject model over a corpus and collect every latent's contexts and statistics (resumable)."""
    from .extract import extract as run
    from .subject import load_subject

    subject = load_subject(model, device=device, dtype=dtype)
    dicts = [_resolve_dictionary(d, subject) for d in dictionary]
    caches = run(subject, dicts, list(hookpoint) if hookpoint else None, corpus, out, n_tokens=n_tokens,
                 ctx_len=ctx_len, batch_size=batch_size, seed=seed, top_k=top_k, n_sample=n_sample,
                 pool_size=pool_size, text_column=text_column, split=split, overwrite=overwrite, progress=progress,
                 checkpoint_every_s=checkpoint_every, max_norm_ratio=max_norm_ratio, encode_dtype=encode_dtype,
                 norm_scaling_factor=norm_scaling_factor, check_corpus=check_corpus)
    for c in caches:
        _print_summary(c)


def _print_summary(cache, n_show: int = 10, tokenizer=None) -> None:
    import numpy as np

    s = cache.stats
    alive = cache.alive_latents()
    freq = s["n_active"] / max(1, cache.n_tokens)
    typer.echo(f"\n{cache.path}: {cache.n_latents} latents, {cache.n_tokens} tokens, hookpoint "
               f"{cache.manifest['hookpoint']}, {len(alive)} alive ({len(alive) / cache.n_latents:.1%}), "
               f"{cache.disk_bytes() / 1e6:.1f} MB on disk")
    if len(alive):
        typer.echo(f"firing frequency of alive latents: median {np.median(freq[alive]):.2e}, "
                   f"max {freq[alive].max():.2e}")
    order = alive[:n_show]  # the same latents the demo then explains
    if tokenizer is not None:
        cache.attach_tokenizer(tokenizer)
    typer.echo(f"{'latent':>7} {'freq':>9} {'max':>8} {'mean':>8}  top context")
    for i in order:
        rec = cache.record(int(i))
        ctx = ""
        if len(rec.top):
            acts, toks = rec.top.acts[0], rec.top.tokens[0]
            j = int(acts.argmax())
            words = rec.token_strings(toks[max(0, j - 6): j + 2])
            pivot = min(j, 6)
            words[pivot] = f"<<{words[pivot]}>>"
            ctx = "".join(words).replace("\n", "⏎")
        typer.echo(f"{int(i):>7} {freq[i]:>9.2e} {s['act_max'][i]:>8.2f} "
                   f"{rec.stats.mean_act:>8.2f}  {ctx[:80]}")


@app.command()
@_friendly
def inspect(
    cache: Path = typer.Argument(..., help="A cache folder written by `autointerp extract`."),
    latent: Optional[int] = typer.Option(None, help="Show this latent's top and sampled windows."),
    n: int = typer.Option(5, help="Windows to show."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
):
    """Summarise a latent cache, or show one latent's contexts."""
    from .cache import LatentCache
    c = LatentCache(cache)
    if latent is None and as_json:  # numbers only: no tokenizer needed
        typer.echo(json.dumps(c.summary(), indent=1))
        return
    tok = _tokenizer_for(c)
    if latent is None:
        _print_summary(c, tokenizer=tok)
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
    hookpoint: str = typer.Option("resid_post.15", help="Where to read activations. Trains a plain SAE (codes reconstruct "
                                                    "the same activations); transcoders: the Python API, "
                                                    "train_topk_sae(..., targets=, transcode=True)."),
    corpus: str = typer.Option("builtin", help="Training corpus (same sources as extract)."),
    n_tokens: int = typer.Option(100_000, help="Training tokens."),
    n_latents: int = typer.Option(2048, help="Dictionary size."),
    k: int = typer.Option(32, help="Active latents per token (TopK)."),
    out: Path = typer.Option(Path("runs/sae"), help="Output folder (sparsify format: <out>/<hookpoint>/)."),
    steps: int = typer.Option(1000, help="Optimizer steps (batches of 256 activations)."),
    seed: int = typer.Option(0, help="Seed."),
    device: Optional[str] = typer.Option(None, help="Device."),
):
    """Train a small TopK SAE (sparsify format) — a real dictionary for offline demos and tests."""
    from .activations import collect_activations
    from .corpus import CorpusSpec
    from .subject import load_subject
    from .train_sae import train_topk_sae

    subject = load_subject(model, device=device)
    acts = collect_activations(subject, hookpoint, CorpusSpec(source=corpus, n_tokens=n_tokens, seed=seed))
    result = train_topk_sae(acts, n_latents=n_latents, k=k, out_dir=out, hookpoint=hookpoint, seed=seed,
                            steps=steps, progress=True)
    typer.echo(f"wrote {result.path}: FVU {result.fvu:.3f}, dead {result.dead_fraction:.1%}, {result.steps} steps")


@app.command()
@_friendly
def interpret(
    cache: Path = typer.Argument(..., help="A cache folder written by `autointerp extract`."),
    latents: Optional[str] = typer.Option(None, help="Latents: '0-99,120'. Default: the first --n-latents alive ones."),
    n_latents: int = typer.Option(20, help="How many alive latents when --latents is not given."),
    explainer: str = typer.Option("default", help="Explainer kind: default, activations, cot, contrastive, "
                                                  "token_frequency, random."),
    explainer_model: str = typer.Option("local", help="LLM spec: local, local:MODEL, openai:MODEL, "
                                                      "openai:MODEL@http://host:port/v1."),
    judge_model: Optional[str] = typer.Option(None, help="Judge LLM spec for the scorers (default: the explainer's)."),
    scorers: str = typer.Option("detection,fuzzing", help="Comma-separated: detection, fuzzing, intruder, "
                                                          "simulation, embedding, surprisal, intervention."),
    out: Optional[Path] = typer.Option(None, help="Results JSON-lines file (default: <cache>/results.jsonl)."),
    seed: int = typer.Option(0, help="Sampling seed (recorded with every row)."),
    concurrency: int = typer.Option(8, help="Latents in flight."),
    llm_concurrency: int = typer.Option(16, help="Requests in flight per LLM endpoint."),
    prices: Optional[Path] = typer.Option(None, help="Price table (JSON/TOML: model -> $ per 1M prompt/completion tokens)."),
    hard_negatives: bool = typer.Option(True, help="Embed the random pool once to pick hard negatives."),
    batch_size: Optional[int] = typer.Option(None, min=1, help="Examples per judge call for detection and fuzzing "
                                             "(default 20: keeps explain + detection + fuzzing within 10 calls per "
                                             "latent; the reference method uses 10)."),
    scorer_option: Optional[List[str]] = typer.Option(None, "--scorer-option", "-o",
                                                      help="SCORER.FIELD=VALUE (repeatable), a field of the scorer's "
                                                           "Config; VALUE is JSON or a string, e.g. "
                                                           "intervention.strengths=[0.5,1], simulation.mode=json."),
    prompt_dir: Optional[Path] = typer.Option(None, help="Folder of prompt templates (<name>.md) replacing the "
                                                          "packaged ones for the explainer and every scorer."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
):
    """Explain and score latents of a cache (resumable: re-running skips what is done)."""
    import asyncio

    from .cache import LatentCache
    from .errors import ConfigError
    from .interpret import (InterpretConfig, check_scorer_options, in_job, interpret as run, job_key, parse_latents,
                            read_results)
    from .llm import client_from_spec
    from .metrics import aggregate, format_table
    from .scorers import get_scorer

    names = [n.strip() for n in scorers.split(",") if n.strip()]
    for n in names:
        get_scorer(n)  # unknown names fail before any work
    options = check_scorer_options(names, _parse_scorer_options(list(scorer_option or []), batch_size, names))
    if prompt_dir is not None and not prompt_dir.is_dir():
        raise ConfigError(f"--prompt-dir {prompt_dir}: not a folder")
    c = LatentCache(cache)
    tok = _tokenizer_for(c)
    c.attach_tokenizer(tok)
    ids = parse_latents(latents, c, n_latents)
    out = out or (cache / "results.jsonl")
    kw = {"concurrency": llm_concurrency, "prices": str(prices) if prices else None}
    explainer_client = client_from_spec(explainer_model, **kw)
    judge_client = explainer_client if not judge_model or judge_model == explainer_model else \
        client_from_spec(judge_model, **kw)
    cfg = InterpretConfig(explainer=explainer, scorers=names, seed=seed, concurrency=concurrency,
                          hard_negatives=hard_negatives, scorer_options=options, prompt_dir=prompt_dir)
    context = {}
    if {"intervention", "surprisal"} & set(names):
        context = _scorer_context(c)

    async def go():
        try:
            return await run(c, ids, explainer_client=explainer_client, judge_client=judge_client, config=cfg,
                             out=out, progress=progress, scorer_context=context)
        finally:
            for cl in {id(explainer_client): explainer_client, id(judge_client): judge_client}.values():
                await cl.aclose()

    summary = asyncio.run(go())
    wanted = set(ids)
    key, judge = job_key(c, cfg, explainer_client), getattr(judge_client, "model", "") or ""
    latest = {}  # this job's rows only (its explainer and judge models too), the last one per (latent, scorer)
    for r in read_results(out):
        if r["type"] == "score" and r["latent"] in wanted and in_job(r, key, judge):
            latest[(r["latent"], r["scorer"])] = r
    typer.echo(format_table(aggregate(latest.values())))  # the rows carry their dictionary id
    u = summary.usage
    typer.echo(f"\n{summary.latents_done} latents done, {summary.latents_already_done} already done, "
               f"{summary.latents_skipped} skipped, {summary.latents_failed} failed (retry by re-running); "
               f"LLM: {u.calls} calls ({u.cached_calls} cached), {u.prompt_tokens} prompt + {u.completion_tokens} "
               f"completion tokens, ${u.cost_usd:.4f}; results in {out}")
    for e in summary.errors[:5]:
        typer.echo(f"  {e}", err=True)


def _tokenizer_for(cache):
    from .hf_loading import load_tokenizer

    return load_tokenizer(cache.manifest["model"])


def _scorer_context(cache) -> dict:
    """What the scorers that run a model need, keyed by their Config field names (interpret copies each into the
    Configs that have that field): intervention steers the subject model with the dictionary's decoder at the
    cache's hookpoint (a transcoder: at its module's output, see SteeringTarget.from_subject); surprisal reads
    with the subject model already loaded (`lm`) rather than loading its default LM a second time."""
    from .dictionaries import load_cached_dictionary
    from .subject import load_subject

    subject = load_subject(cache.manifest["model"])
    dictionary = load_cached_dictionary(cache.manifest["dictionary"])
    return {"subject": subject, "dictionary": dictionary, "hookpoint": cache.manifest["hookpoint"],
            "lm": (subject.model, subject.tokenizer)}


@app.command()
@_friendly
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="Where the demo writes its cache and results."),
    n_tokens: int = typer.Option(60_000, help="Tokens to extract over."),
    n_latents: int = typer.Option(12, help="Latents to explain and score."),
):
    """The offline demo: SmolLM2 + a locally trained SAE → extraction → explanations scored by the local embedder."""
    import asyncio

    from .demo import ensure_demo_dictionary
    from .extract import extract as run
    from .interpret import InterpretConfig, interpret as run_interpret, parse_latents, read_results
    from .subject import load_subject

    typer.echo("[demo] loading SmolLM2-135M (first run dequantizes the packaged GGUF once, ~30 s)")
    subject = load_subject("builtin:smollm2")
    typer.echo("[demo] demo dictionary (trained once on this machine, then cached)")
    sae = ensure_demo_dictionary(subject)
    typer.echo(f"[demo] extracting {n_tokens} tokens at {sae.name}")
    (cache,) = run(subject, str(sae), None, "builtin", out, n_tokens=n_tokens)
    _print_summary(cache, tokenizer=subject.tokenizer)
    # No LLM is needed for this part: the token-frequency baseline explains, the local MiniLM embedder scores.
    # With an LLM: autointerp interpret <cache> --explainer-model local|openai:MODEL@URL --scorers detection,fuzzing
    typer.echo(f"\n[demo] explaining {n_latents} latents (token-frequency baseline) and scoring them (embedding AUC)")
    cache.attach_tokenizer(subject.tokenizer)
    ids = parse_latents(None, cache, n_latents)
    results = out / "results.jsonl"
    cfg = InterpretConfig(explainer="token_frequency", scorers=("embedding",), hard_negatives=False)
    asyncio.run(run_interpret(cache, ids, explainer_client=None, judge_client=None, config=cfg, out=results))
    rows = [r for r in read_results(results) if r["type"] == "score" and r["latent"] in set(ids)]
    typer.echo(f"{'latent':>7} {'AUC':>6}  explanation")
    for r in sorted(rows, key=lambda r: -(r["metrics"].get("auc") or 0)):
        auc = r["metrics"].get("auc")
        typer.echo(f"{r['latent']:>7} {auc if auc is None else format(auc, '.3f'):>6}  {(r['explanation'] or '')[:90]}")
    typer.echo(f"\n[demo] done: cache in {out}, results in {results}. Next: autointerp inspect {out} --latent N")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
