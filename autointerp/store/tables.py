"""The store's tables (sqlmodel on SQLAlchemy 2). The migrations in autointerp/db/versions create exactly these.

What lives where (bytes per latent in docs/design-notes.md): statistics, histograms, explanations, scores, usage and
jobs are rows here; so are the display examples (top and quantile windows with per-token activations: one compact
blob per latent, each window once; store/examples.py), so that no worker needs another machine's disk. The
extraction's cache folder (`Dictionary.cache_path`, when there is one) is read in place where it exists.

Identity: an explanation is unique per (dictionary, latent, explain_key) and a score per (explanation, score_key);
the keys hash every setting that changes the result (models, prompt versions, sampling, options, seed), so a unit
that runs twice (a retry, a late duplicate from a killed worker) inserts nothing the second time.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Optional

from sqlalchemy import JSON, Column, Index, LargeBinary, UniqueConstraint, text
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


# the job items that carry spend: the predicate of the partial index ix_job_item_spend, and the filter
# `Store.job_spend` repeats word for word so the planner (SQLite, PostgreSQL) can use that index (rows outside it
# are all zeros, which add nothing to the sums)
JOB_ITEM_SPENT = "calls != 0 OR prompt_tokens != 0 OR completion_tokens != 0 OR cost_usd != 0"


class SubjectModelRow(SQLModel, table=True):
    __tablename__ = "subject_model"
    id: Optional[int] = Field(default=None, primary_key=True)
    name: str = Field(unique=True, max_length=500)  # the spec the model loads from (builtin:smollm2, hub id, path)
    created: datetime = Field(default_factory=utcnow)


class DictionaryRow(SQLModel, table=True):
    """One dictionary at one hookpoint, as extracted (the latest extraction's statistics and cache)."""

    __tablename__ = "dictionary"
    id: Optional[int] = Field(default=None, primary_key=True)
    key: str = Field(unique=True, max_length=1000)  # "<dictionary id>@<hookpoint>"
    name: str = Field(index=True, max_length=300)  # short, for humans and the CLI
    dictionary_id: str = Field(max_length=1000)  # the checkpoint's id (autointerp.dictionaries)
    subject_model_id: int = Field(foreign_key="subject_model.id", index=True)
    hookpoint: str = Field(max_length=300)
    format: str = Field(max_length=50)
    source: str = Field(max_length=1000)  # checkpoint path or hub id
    n_latents: int
    d_in: int
    n_tokens: int = 0
    ctx_len: int = 0
    cache_path: Optional[str] = Field(default=None, max_length=2000)
    n_alive: int = 0
    manifest: Optional[dict[str, Any]] = Field(default=None, sa_column=Column(JSON))  # the extraction's
    extraction_key: Optional[str] = Field(default=None, max_length=64, index=True)  # its settings' hash (jobs)
    examples_in_store: bool = False  # example_window / latent_example hold its display examples
    # a signed dictionary's units: latent i's "+" pole is unit i, its "-" pole unit n_latents / 2 + i (unit_pole)
    signed: bool = False
    quality: Optional[dict[str, Any]] = Field(default=None, sa_column=Column(JSON))  # the reconstruction pass
    created: datetime = Field(default_factory=utcnow)


class Latent(SQLModel, table=True):
    __tablename__ = "latent"
    # pages sorted by max/mean activation are range scans (migration 0004)
    __table_args__ = (Index("ix_latent_max_act", "dictionary_pk", "max_act", "index"),
                      Index("ix_latent_mean_act", "dictionary_pk", "mean_act", "index"),
                      Index("ix_latent_top_head", "dictionary_pk", "top_head"))
    dictionary_pk: int = Field(foreign_key="dictionary.id", primary_key=True)
    index: int = Field(primary_key=True)
    n_active: int = 0
    frequency: float = Field(default=0.0, index=True)
    max_act: float = 0.0
    mean_act: float = 0.0
    hist: Optional[list[int]] = Field(default=None, sa_column=Column(JSON))  # counts over the cache's log2 bins
    heads: Optional[list[float]] = Field(default=None, sa_column=Column(JSON))  # attn_z: decoder-norm share per head
    top_head: Optional[int] = None  # the head with the largest share


class ExplanationRow(SQLModel, table=True):
    __tablename__ = "explanation"
    __table_args__ = (UniqueConstraint("dictionary_pk", "latent", "explain_key", name="uq_explanation_identity"),
                      Index("ix_explanation_latent", "dictionary_pk", "latent"))
    id: Optional[int] = Field(default=None, primary_key=True)
    dictionary_pk: int = Field(foreign_key="dictionary.id")
    latent: int
    explain_key: str = Field(max_length=64)  # hash of the settings that made it
    explainer: str = Field(max_length=50)  # kind: default, cot, contrastive, token_frequency, random, …
    model: str = Field(default="", max_length=500)  # explainer LLM ("" for baselines)
    prompt_version: str = Field(default="", max_length=200)
    seed: int = 0
    text: Optional[str] = None  # None when skipped
    skipped: Optional[str] = None  # reason (too few examples, empty answer)
    parsed: bool = True
    examples_used: Optional[list[int]] = Field(default=None, sa_column=Column(JSON))
    usage: Optional[dict[str, Any]] = Field(default=None, sa_column=Column(JSON))
    cost_usd: float = 0.0
    job_id: Optional[int] = Field(default=None, index=True)  # the job that made it (first writer)
    created: datetime = Field(default_factory=utcnow)


class Score(SQLModel, table=True):
    __tablename__ = "score"
    __table_args__ = (UniqueConstraint("explanation_id", "score_key", name="uq_score_identity"),
                      Index("ix_score_scorer_value", "scorer", "value"))
    id: Optional[int] = Field(default=None, primary_key=True)
    explanation_id: int = Field(foreign_key="explanation.id", index=True)
    score_key: str = Field(max_length=64)
    scorer: str = Field(max_length=50)
    model: str = Field(default="", max_length=500)  # judge / scorer model
    prompt_version: str = Field(default="", max_length=300)
    seed: int = 0
    value: Optional[float] = None  # the scorer's headline metric (for sorting and filters)
    metrics: Optional[dict[str, Any]] = Field(default=None, sa_column=Column(JSON))
    details: Optional[dict[str, Any]] = Field(default=None, sa_column=Column(JSON))
    skipped: Optional[str] = None
    usage: Optional[dict[str, Any]] = Field(default=None, sa_column=Column(JSON))
    cost_usd: float = 0.0
    job_id: Optional[int] = Field(default=None, index=True)
    created: datetime = Field(default_factory=utcnow)


class ExplanationEmbedding(SQLModel, table=True):
    """Explanation text embeddings for semantic search (float32 bytes; pgvector mirrors them on PostgreSQL)."""

    __tablename__ = "explanation_embedding"
    explanation_id: int = Field(foreign_key="explanation.id", primary_key=True)
    embedder: str = Field(primary_key=True, max_length=300)
    dim: int
    vector: bytes = Field(sa_column=Column(LargeBinary, nullable=False))


class Job(SQLModel, table=True):
    __tablename__ = "job"
    id: Optional[int] = Field(default=None, primary_key=True)
    key: str = Field(index=True, max_length=64)  # hash of the spec's result-changing fields
    kind: str = Field(default="interpret", max_length=50)
    spec: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    dictionary_pk: Optional[int] = Field(default=None, foreign_key="dictionary.id", index=True)
    status: str = Field(default="pending", max_length=30)  # pending running done failed cancelled budget_exhausted
    budget_usd: Optional[float] = None
    n_items: int = 0
    error: Optional[str] = None
    created: datetime = Field(default_factory=utcnow)
    started: Optional[datetime] = None
    finished: Optional[datetime] = None
    updated: datetime = Field(default_factory=utcnow)


class JobItem(SQLModel, table=True):
    """One unit of a job: (latent, stage) with stage "explain" or "score:<scorer>". The lease is what guarantees
    completion: a worker renews it while it works; an item whose lease ran out is handed out again."""

    __tablename__ = "job_item"
    __table_args__ = (
        Index("ix_job_item_status", "job_id", "status", "latent"),
        # `job status` at millions of items: the (stage, status) counts are index-only range counts, and the spend
        # sums read only the items that have spend, from the index (Store.item_counts, Store.job_spend)
        Index("ix_job_item_stage", "job_id", "stage", "status"),
        Index("ix_job_item_spend", "job_id", "prompt_tokens", "completion_tokens", "calls", "cost_usd",
              sqlite_where=text(JOB_ITEM_SPENT), postgresql_where=text(JOB_ITEM_SPENT)),
    )
    job_id: int = Field(foreign_key="job.id", primary_key=True)
    latent: int = Field(primary_key=True)
    stage: str = Field(primary_key=True, max_length=60)
    status: str = Field(default="pending", max_length=20)  # pending running done failed skipped
    attempts: int = 0
    lease_until: Optional[datetime] = None
    worker: Optional[str] = Field(default=None, max_length=200)
    error: Optional[str] = None
    # this job's LLM spend on the item, failed attempts included
    prompt_tokens: int = 0
    completion_tokens: int = 0
    calls: int = 0
    cost_usd: float = 0.0
    progress: Optional[dict[str, Any]] = Field(default=None, sa_column=Column(JSON))  # an extract shard's tokens, rate
    updated: datetime = Field(default_factory=utcnow)


class ExampleWindow(SQLModel, table=True):
    """A token window some latent's examples (or the negative pool) refer to, stored once per dictionary."""

    __tablename__ = "example_window"
    dictionary_pk: int = Field(foreign_key="dictionary.id", primary_key=True)
    row: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    tokens: bytes = Field(sa_column=Column(LargeBinary, nullable=False))  # little-endian ids (manifest: dtype)


class LatentExample(SQLModel, table=True):
    """One latent's top and sample windows as one compact blob (store/examples.py has the layout)."""

    __tablename__ = "latent_example"
    dictionary_pk: int = Field(foreign_key="dictionary.id", primary_key=True)
    latent: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    data: bytes = Field(sa_column=Column(LargeBinary, nullable=False))


class Blob(SQLModel, table=True):
    """Bytes a job's units hand each other (a shard's collector state), in parts of a few MB."""

    __tablename__ = "blob"
    key: str = Field(primary_key=True, max_length=300)
    part: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    data: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    created: datetime = Field(default_factory=utcnow)


class Comparison(SQLModel, table=True):
    __tablename__ = "comparison"
    id: Optional[int] = Field(default=None, primary_key=True)
    dictionary_a: int = Field(foreign_key="dictionary.id", index=True)
    dictionary_b: int = Field(foreign_key="dictionary.id", index=True)
    method: str = Field(max_length=50)
    params: Optional[dict[str, Any]] = Field(default=None, sa_column=Column(JSON))
    summary: Optional[dict[str, Any]] = Field(default=None, sa_column=Column(JSON))
    result: Optional[dict[str, Any]] = Field(default=None, sa_column=Column(JSON))
    created: datetime = Field(default_factory=utcnow)


class Analysis(SQLModel, table=True):
    """A corpus-level result on one dictionary (autointerp.corpus_latents): a dataset diff or a separability run."""

    __tablename__ = "analysis"
    id: Optional[int] = Field(default=None, primary_key=True)
    kind: str = Field(max_length=50)  # diff | separability
    dictionary_pk: int = Field(foreign_key="dictionary.id", index=True)
    title: str = Field(max_length=500)  # "corpusA vs corpusB"
    params: Optional[dict[str, Any]] = Field(default=None, sa_column=Column(JSON))
    summary: Optional[dict[str, Any]] = Field(default=None, sa_column=Column(JSON))
    result: Optional[dict[str, Any]] = Field(default=None, sa_column=Column(JSON))
    created: datetime = Field(default_factory=utcnow)


class LatentStat(SQLModel, table=True):
    """A number per latent that scores no explanation (separability, random-token firing rate): sortable and a filter."""

    __tablename__ = "latent_stat"
    __table_args__ = (Index("ix_latent_stat_value", "dictionary_pk", "stat", "value"),)
    dictionary_pk: int = Field(foreign_key="dictionary.id", primary_key=True)
    latent: int = Field(primary_key=True)
    stat: str = Field(max_length=50, primary_key=True)
    stat_key: str = Field(max_length=64, primary_key=True)  # hash of the settings that made it
    value: Optional[float] = None
    details: Optional[dict[str, Any]] = Field(default=None, sa_column=Column(JSON))
    analysis_id: Optional[int] = None  # the analysis that made it
    created: datetime = Field(default_factory=utcnow)


class ApiKey(SQLModel, table=True):
    __tablename__ = "api_key"
    id: Optional[int] = Field(default=None, primary_key=True)
    name: str = Field(max_length=200)
    key_hash: str = Field(unique=True, max_length=128)  # sha256 of the key; the key itself is never stored
    created: datetime = Field(default_factory=utcnow)
    revoked: bool = False
