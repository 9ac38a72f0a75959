"""A job is data: `JobSpec` (pydantic) — what the Job row, a Celery message and the OpenAPI schema carry.

Identity. `explain_identity` and `score_identity` hold every setting that changes a result: dictionary, explainer
kind and model, prompt versions (content hashes of the template files), sampling (display windows included), every
scorer setting as its value (defaults included: a changed default is another result), seed. Their hashes
key the stored explanation and score rows, so "already done" means done with these settings; runtime settings
(concurrency, timeouts, retries, prices, budget) are not part of it. The job key adds the latent selection.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..errors import ConfigError
from ..explainers import EXPLAINERS, LLM_EXPLAINERS, ExplainConfig, check_kind
from ..llm.client import parse_spec
from ..names import digest  # noqa: F401 — re-exported: job keys are digests
from ..prompt_files import _load, prompts_dir
from ..sampling import SamplingConfig
from ..scorers import SCORERS
from .scoring import check_scorer_options, scorer_config_for_key

STAGE_EXPLAIN = "explain"
STAGE_EXTRACT = "extract"  # one item per shard (its index in the item's `latent`)
STAGE_MERGE = "merge"  # one item (latent 0): the shards merged, the dictionary registered, the latents queued
EXTRACTION_STAGES = (STAGE_EXTRACT, STAGE_MERGE)


def score_stage(scorer: str) -> str:
    return f"score:{scorer}"


class LLMSettings(BaseModel):
    """How LLM calls are made (not part of any result's identity)."""

    model_config = ConfigDict(extra="forbid")
    timeout_s: float = Field(60.0, gt=0, description="Seconds per request before it counts as a timeout")
    max_retries: int = Field(5, ge=0, description="Retries of a transient failure (429, 5xx, timeout)")
    concurrency: int = Field(32, ge=1, description="Requests in flight per endpoint and process")
    backoff_base_s: float = Field(1.0, ge=0, description="First retry delay (doubles, with jitter)")
    response_cache: bool = Field(True, description="Reuse identical earlier answers (no second payment)")
    api_key_env: Optional[str] = Field("OPENAI_API_KEY", description="Environment variable holding the API key")
    prices: Optional[str] = Field(None, description="Price table file (JSON/TOML)")


class ExtractionSpec(BaseModel):
    """What to extract first: the subject model, one dictionary at its hookpoint, the corpus (as `autointerp
    extract` takes them). Everything here but `shards` and `device` changes the result and is hashed into the
    extraction's identity: a job on the same settings reuses an extraction already in the store."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field("builtin:smollm2", description="Subject model: builtin:smollm2, a hub id, a folder, a .gguf")
    dictionary: str = Field(..., description="Checkpoint: a folder, a hub id, neurons, topk-neurons:K")
    hookpoint: Optional[str] = Field(None, description="Where the dictionary reads (default: what it names)")
    corpus: str = Field("builtin", description="builtin, builtin:code, a .txt/.jsonl/.parquet file, hf:NAME")
    n_tokens: int = Field(100_000, ge=1)
    ctx_len: int = Field(64, ge=2)
    batch_size: int = Field(32, ge=1, description="Windows per forward pass (the shards' boundaries)")
    seed: int = 0
    top_k: int = Field(50, ge=1)
    n_sample: int = Field(100, ge=1)
    pool_size: int = Field(1000, ge=0)
    text_column: str = "text"
    split: str = "train"
    chat: bool = Field(False, description="The corpus is conversations ({messages: [...]}) through the chat "
                                          "template, one per window run, roles kept (autointerp.chat)")
    special_tokens: Literal["keep", "drop"] = Field("keep", description="chat: the template's special tokens")
    dtype: Optional[str] = Field(None, description="Subject model dtype (float32, bfloat16, float16)")
    encode_dtype: Optional[str] = Field(None, description="Dictionary encode dtype (default float32)")
    max_norm_ratio: float = Field(5.0, gt=0)
    shards: Optional[int] = Field(None, ge=1, description="Shards (default: one per ~1M tokens); the result does "
                                                         "not depend on it")
    device: Optional[str] = Field(None, description="Device of the GPU workers (default: CUDA when present)")
    also: list[str] = Field(default_factory=list, description="More dictionaries collected in the same forward "
                            "passes (each at `hookpoint`, or where it names) and registered for later jobs; this job "
                            "explains `dictionary`")
    names: list[str] = Field(default_factory=list, description="Names in the store for `dictionary`, then each of "
                             "`also` (default: from the checkpoint and hookpoint)")

    def identity(self) -> dict:
        # the chat fields enter only when set: extractions made before they existed keep their keys
        chat = set() if self.chat else {"chat", "special_tokens"}
        return self.model_dump(mode="json", exclude={"shards", "device", "also", "names", *chat})

    def corpus_spec(self):
        from ..corpus import CorpusSpec

        return CorpusSpec(source=self.corpus, ctx_len=self.ctx_len, n_tokens=self.n_tokens, seed=self.seed,
                          text_column=self.text_column, split=self.split, chat=self.chat,
                          special_tokens=self.special_tokens)

    def members(self) -> list["ExtractionSpec"]:
        """One spec per dictionary this extraction collects (`dictionary` first): each one's key is what a
        single-dictionary job on it would have, so a later job finds it."""
        return [self] + [self.model_copy(update={"dictionary": d, "also": [], "names": []}) for d in self.also]

    def key(self) -> str:
        return digest(self.identity())

    def n_shards(self) -> int:
        from ..shards import default_shards

        return min(self.shards or default_shards(self.n_tokens), max(1, self.n_tokens // self.ctx_len))

    def shard_bounds(self) -> list[tuple[int, int]]:
        from ..shards import shard_bounds

        return shard_bounds(max(1, self.n_tokens // self.ctx_len), self.batch_size, self.n_shards())

    def extract_kwargs(self) -> dict:
        """The keyword arguments of `extract` / `extract_shard` these settings name."""
        return self.model_dump(exclude={"model", "dictionary", "hookpoint", "corpus", "shards", "also", "names",
                                        "chat", "special_tokens"})


class JobSpec(BaseModel):
    """Explain and score latents of one dictionary: already extracted (`dictionary`), or extracted by this job
    first (`extraction`)."""

    model_config = ConfigDict(extra="forbid")
    dictionary: Optional[str] = Field(None, description="A cache folder written by `autointerp extract`, or a "
                                                        "dictionary name/key in the store")
    extraction: Optional[ExtractionSpec] = Field(None, description="Extract first (sharded over the gpu queue); "
                                                                   "instead of `dictionary`")
    latents: Union[str, list[int], None] = Field(None, description="'all', '0-99,120', a list, or null (the first "
                                                                   "n_latents alive latents)")
    n_latents: int = Field(20, ge=1, description="How many alive latents when `latents` is null")
    explainer: str = "default"
    explainer_model: str = Field("local", description="local, local:MODEL, openai:MODEL[@BASE_URL]")
    judge_model: Optional[str] = Field(None, description="Judge LLM for the scorers (default: the explainer's)")
    scorers: list[str] = Field(default_factory=lambda: ["detection", "fuzzing"])
    scorer_options: dict[str, dict[str, Any]] = Field(default_factory=dict)
    sampling: dict[str, Any] = Field(default_factory=dict, description="SamplingConfig fields")
    seed: int = 0
    hard_negatives: bool = Field(True, description="Pick half the negatives by embedding similarity")
    prompt_dir: Optional[str] = None
    concurrency: int = Field(16, ge=1, description="Latents in flight per process")
    llm: LLMSettings = Field(default_factory=LLMSettings)
    budget_usd: Optional[float] = Field(None, ge=0, description="Stop scheduling LLM work past this spend")

    @field_validator("explainer")
    @classmethod
    def _kind(cls, v: str) -> str:
        if v not in EXPLAINERS:
            raise ValueError(f"unknown explainer {v!r}; valid: {', '.join(EXPLAINERS)}")
        return v

    @field_validator("scorers")
    @classmethod
    def _scorers(cls, v: list[str]) -> list[str]:
        bad = [s for s in v if s not in SCORERS]
        if bad:
            raise ValueError(f"unknown scorer {bad[0]!r}; valid: {', '.join(SCORERS)}")
        if len(set(v)) != len(v):
            raise ValueError("a scorer is named twice")
        return v

    @field_validator("explainer_model", "judge_model")
    @classmethod
    def _llm(cls, v: Optional[str]) -> Optional[str]:
        if v is not None:
            try:
                parse_spec(v)
            except ConfigError as e:
                raise ValueError(str(e)) from None
        return v

    @model_validator(mode="after")
    def _one_source(self) -> "JobSpec":
        if (self.dictionary is None) == (self.extraction is None):
            raise ValueError("give either dictionary (an extracted one) or extraction (what to extract), not both")
        return self

    @property
    def judge(self) -> str:
        return self.judge_model or self.explainer_model

    def sampling_config(self) -> SamplingConfig:
        try:
            return SamplingConfig(**self.sampling)
        except TypeError as e:
            raise ConfigError(f"sampling: {e}") from None

    def stages(self) -> list[str]:
        return [STAGE_EXPLAIN] + [score_stage(s) for s in self.scorers]


def parse_job_spec(data: dict | str | JobSpec) -> JobSpec:
    """A JobSpec from JSON text or a dict; one line naming the first bad field."""
    if isinstance(data, JobSpec):
        return data
    from pydantic import ValidationError

    try:
        return JobSpec.model_validate_json(data) if isinstance(data, str) else JobSpec.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "spec"
        msg = err["msg"].removeprefix("Value error, ")
        raise ConfigError(f"job spec field {where}: {msg}") from None


def model_identity(spec: str) -> str:
    """What names a model's answers: backend and model, not the server's address (one model served anywhere); for
    the in-process backend, its quantization too (an int8 model answers differently)."""
    p = parse_spec(spec)
    if p["backend"] == "local":
        from ..llm.local_backend import local_quantization, quantized_name

        return quantized_name(f"local:{p['model'] or ''}", local_quantization())
    return f"{p['backend']}:{p['model'] or ''}"


def _prompt_dir(spec: JobSpec) -> Path | None:
    return Path(spec.prompt_dir) if spec.prompt_dir else None


def template_versions(config) -> list[str]:
    """Content versions of the prompt files a Config names (fields `prompt`, `prompt_*`), read now: a missing
    file fails here, before any work."""
    directory = getattr(config, "prompt_dir", None) or prompts_dir()
    out = []
    for f in dataclasses.fields(config):
        v = getattr(config, f.name)
        if f.name.startswith("prompt") and f.name != "prompt_dir" and isinstance(v, str) and v:
            out.append(_load((Path(directory) / f"{v}.md").resolve()).version)
    return sorted(out)


def explainer_versions(spec: JobSpec) -> list[str]:
    from ..explainers import templates

    return [t.version for t in templates(spec.explainer, ExplainConfig(prompt_dir=_prompt_dir(spec)))]


def scorer_options(spec: JobSpec) -> dict[str, dict[str, Any]]:
    return check_scorer_options(spec.scorers, spec.scorer_options)


def explain_identity(spec: JobSpec, dictionary_key: str) -> dict:
    check_kind(spec.explainer)
    llm = spec.explainer in LLM_EXPLAINERS
    return {"dictionary": dictionary_key, "explainer": spec.explainer,
            "model": model_identity(spec.explainer_model) if llm else "",
            "prompts": explainer_versions(spec), "sampling": dataclasses.asdict(spec.sampling_config()),
            "seed": spec.seed, "hard_negatives": spec.hard_negatives if spec.explainer == "contrastive" else None}


_RUNTIME_FIELDS = {"sampling", "prompt_dir", "max_concurrency", "device"}  # keyed elsewhere, or not result-changing


def config_options(config) -> dict:
    """A scorer Config's settings as a result's identity holds them, defaults included: a changed default (e.g.
    detection's batch size) must not read as "already done". Left out: live objects (compare=False), the sampling
    (keyed on its own), prompt templates (keyed by content version) and runtime settings."""
    out = {}
    for f in dataclasses.fields(config):
        v = getattr(config, f.name)
        if not f.compare or f.name in _RUNTIME_FIELDS or (f.name.startswith("prompt") and isinstance(v, str)):
            continue
        if f.metadata.get("identity_omit_default") and v == f.default:  # a later field: old keys stay valid
            continue
        out[f.name] = v
    return out


def score_identity(spec: JobSpec, scorer: str, explain_key: str) -> dict:
    cfg = scorer_config_for_key(scorer, spec)
    return {"explanation": explain_key, "scorer": scorer, "judge": model_identity(spec.judge),
            "prompts": template_versions(cfg), "options": config_options(cfg),
            "sampling": dataclasses.asdict(cfg.sampling) if hasattr(cfg, "sampling") else None,
            "seed": spec.seed, "hard_negatives": spec.hard_negatives}


def job_identity(spec: JobSpec, dictionary_key: str, latents: list[int]) -> dict:
    ek = digest(explain_identity(spec, dictionary_key))
    return {"explain": ek, "scores": {s: digest(score_identity(spec, s, ek)) for s in spec.scorers},
            "latents": digest(latents)}


__all__ = ["JobSpec", "ExtractionSpec", "LLMSettings", "STAGE_EXTRACT", "STAGE_MERGE", "EXTRACTION_STAGES", "parse_job_spec", "digest", "explain_identity", "score_identity",
           "job_identity", "STAGE_EXPLAIN", "score_stage"]
