"""Request and response bodies of the HTTP API (pydantic): what the committed openapi.json describes."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_TEXT_CHARS = 2000
MAX_PROMPT_CHARS = 1000
MAX_QUERY_CHARS = 500


class Problem(BaseModel):
    """Every 4xx/5xx body: what went wrong, in one line, and where."""

    error: str = Field(..., description="Short machine-readable kind: bad_request, not_found, unauthorized, ...")
    detail: str = Field(..., description="One line for a person: what was wrong and what was expected")
    field: Optional[str] = Field(None, description="The request field at fault, when there is one")


class SubjectModelOut(BaseModel):
    id: int
    name: str
    n_dictionaries: int
    created: datetime


class DictionaryOut(BaseModel):
    id: int
    name: str
    key: str
    dictionary_id: str
    subject_model: str
    hookpoint: str
    format: str
    source: str
    n_latents: int = Field(..., description="Stored units: a signed dictionary's latents count twice (both poles)")
    d_in: int
    n_tokens: int
    ctx_len: int
    n_alive: int
    signed: bool = Field(False, description="Codes of either sign: each latent is stored as a '+' and a '-' pole")
    quality: Optional[dict[str, Any]] = Field(
        None, description="The extraction's quality pass (null when it was skipped): l0, l0_hist {edges, counts}, "
        "fvu, loss_clean, loss_spliced, loss_with_error, loss_zero_ablated, kl_spliced, loss_recovered, "
        "dead_fraction, dense_fraction, n_tokens, n_windows, spliced_at")
    n_explained: int = 0
    n_explanations: int = 0
    n_scores: int = 0
    cost_usd: float = 0.0
    has_cache: bool = False
    created: datetime


class ScoreAggregate(BaseModel):
    scorer: str
    explainer: str
    explainer_model: str
    judge_model: str
    n: int = Field(..., description="Score rows")
    n_skipped: int = Field(..., description="Rows without a headline value (skipped or unscorable)")
    mean: Optional[float]
    min: Optional[float]
    max: Optional[float]
    cost_usd: float
    hist: list[int] = Field(..., description="Counts of the headline score in equal bins over [0, 1]")


class DictionaryDetail(DictionaryOut):
    scores: list[ScoreAggregate]
    explainers: list[str]


class LatentRow(BaseModel):
    index: int
    n_active: int
    frequency: float
    max_act: float
    mean_act: float
    score: Optional[float] = Field(None, description="Best headline score by the requested scorer")
    explanation: Optional[str] = Field(None, description="The latent's best explanation (LLM before baselines)")
    explainer: Optional[str] = None
    scores: dict[str, float] = Field(default_factory=dict, description="Best headline score per scorer")
    pole: Optional[Literal["+", "-"]] = Field(None, description="Signed dictionaries: which pole of `base_latent` "
                                              "this unit is (unit i is latent i's '+' pole, n/2 + i its '-' pole)")
    base_latent: Optional[int] = Field(None, description="Signed dictionaries: the latent this pole belongs to")
    top_head: Optional[int] = Field(None, description="attn_z dictionaries: the attention head holding the largest "
                                                      "share of the decoder row's squared norm")
    stat: Optional[float] = Field(None, description="The requested latent statistic (`stat`), when asked for")


class LatentPage(BaseModel):
    items: list[LatentRow]
    next_cursor: Optional[str] = Field(None, description="Pass as `cursor` for the next page; null at the end")


class ScoreOut(BaseModel):
    id: int
    scorer: str
    value: Optional[float] = Field(None, description="The scorer's headline metric")
    metrics: dict[str, Any] = Field(default_factory=dict)
    model: str
    prompt_version: str
    seed: int
    skipped: Optional[str] = None
    usage: dict[str, Any] = Field(default_factory=dict)
    cost_usd: float = 0.0
    job_id: Optional[int] = None
    created: datetime


class ExplanationOut(BaseModel):
    id: int
    text: Optional[str]
    explainer: str
    model: str
    prompt_version: str
    seed: int
    skipped: Optional[str] = None
    usage: dict[str, Any] = Field(default_factory=dict)
    cost_usd: float = 0.0
    total_cost_usd: float = Field(0.0, description="The explanation's cost plus its scores'")
    mean_score: Optional[float] = None
    job_id: Optional[int] = None
    created: datetime
    scores: list[ScoreOut]


class Example(BaseModel):
    window: int = Field(..., description="Window id in the extraction cache")
    tokens: list[str]
    token_ids: list[int]
    acts: list[float] = Field(..., description="The latent's activation at each token")
    max_act: float


class Quantile(BaseModel):
    label: str
    lo: float
    hi: float
    examples: list[Example]


class MetaMember(BaseModel):
    unit: int = Field(description="The base dictionary's unit (latent, or pole of a signed latent)")
    label: str
    activation: float = Field(description="The meta-latent's activation on the unit's unit-norm decoder row")
    explanation: Optional[str] = Field(None, description="The unit's newest explanation that is not a baseline")


class MetaMembers(BaseModel):
    base_dictionary: str
    base_dictionary_pk: int
    n_members: int = Field(description="Base units the meta-latent fires on (the list holds the strongest)")
    analysis_id: int = Field(description="The meta analysis the member lists come from")
    members: list[MetaMember]


class LatentDetail(BaseModel):
    dictionary: str
    dictionary_pk: int
    index: int
    pole: Optional[Literal["+", "-"]] = Field(None, description="Signed dictionaries: which pole of `base_latent` "
                                              "this unit is (unit i is latent i's '+' pole, n/2 + i its '-' pole)")
    base_latent: Optional[int] = Field(None, description="Signed dictionaries: the latent this pole belongs to")
    top_head: Optional[int] = Field(None, description="attn_z dictionaries: the attention head holding the largest "
                                                      "share of the decoder row's squared norm")
    n_active: int
    frequency: float
    max_act: float
    mean_act: float
    hist: Optional[list[int]] = Field(None, description="Counts of nonzero activations per bin")
    heads: Optional[list[float]] = Field(None, description="attn_z dictionaries: the decoder row's squared-norm share "
                                                           "per attention head (sums to 1)")
    hist_edges: Optional[list[float]] = Field(None, description="Bin edges (log2-spaced), len(hist) + 1")
    top: list[Example] = Field(default_factory=list)
    quantiles: list[Quantile] = Field(default_factory=list)
    examples_available: bool = Field(False, description="False when the extraction cache is not on this machine")
    explanations: list[ExplanationOut]
    cost_usd: float = Field(0.0, description="Everything spent on this latent's explanations and scores")
    meta: Optional[MetaMembers] = Field(None, description="Meta-dictionaries: the base latents this meta-latent "
                                                          "fires on, with their explanations (it has no token "
                                                          "examples)")


class SearchHitOut(BaseModel):
    explanation_id: int
    dictionary: str
    dictionary_pk: int
    hookpoint: str
    latent: int
    text: str
    explainer: str
    model: str
    similarity: Optional[float] = None
    frequency: Optional[float] = None
    scores: dict[str, Optional[float]] = Field(default_factory=dict)
    pole: Optional[Literal["+", "-"]] = Field(None, description="Signed dictionaries: which pole of `base_latent` "
                                              "this unit is (unit i is latent i's '+' pole, n/2 + i its '-' pole)")
    base_latent: Optional[int] = Field(None, description="Signed dictionaries: the latent this pole belongs to")
    top_head: Optional[int] = Field(None, description="attn_z dictionaries: the attention head holding the largest "
                                                      "share of the decoder row's squared norm")


class SearchResult(BaseModel):
    query: str
    mode: Literal["semantic", "keyword"]
    hits: list[SearchHitOut]


class ComparisonRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    a: str = Field(..., max_length=1000, description="First dictionary (name, key or id)")
    b: str = Field(..., max_length=1000, description="Second dictionary")
    method: Literal["embedding", "decoder", "encoder", "activation", "itda-jaccard"] = "embedding"


class ComparisonOut(BaseModel):
    id: int
    dictionary_a: int
    dictionary_b: int
    method: str
    params: Optional[dict[str, Any]] = None
    summary: Optional[dict[str, Any]] = None
    result: Optional[dict[str, Any]] = None
    created: datetime


class AnalysisOut(BaseModel):
    """A corpus-level result on one dictionary: `diff` (latents by firing-rate difference between two corpora, with
    example documents from each side) or `separability` (latents by JS distance between labelled texts)."""
    id: int
    kind: str
    dictionary_pk: int
    title: str
    params: Optional[dict[str, Any]] = None
    summary: Optional[dict[str, Any]] = None
    result: Optional[dict[str, Any]] = None
    created: datetime


class DiffRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dictionary: str = Field(..., max_length=1000)
    texts_a: list[Annotated[str, Field(max_length=20_000)]] = Field(..., min_length=1, max_length=500,
                                                                     description="Documents of side A")
    texts_b: list[Annotated[str, Field(max_length=20_000)]] = Field(..., min_length=1, max_length=500,
                                                                     description="Documents of side B")
    label_a: str = Field("A", max_length=200)
    label_b: str = Field("B", max_length=200)
    top: int = Field(20, ge=1, le=100)
    max_tokens: int = Field(128, ge=1, le=512, description="Tokens read per document")
    alpha: float = Field(0.05, ge=0.0, le=1.0, description="False-discovery rate for 'significant'")


class ActivationsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dictionary: str = Field(..., max_length=1000)
    text: str = Field(..., min_length=1, max_length=MAX_TEXT_CHARS)
    top_k: int = Field(5, ge=1, le=50, description="Latents per token")


class TokenLatent(BaseModel):
    latent: int
    activation: float
    explanation: Optional[str] = None


class TokenActivations(BaseModel):
    position: int
    token: str
    token_id: int
    special: bool
    latents: list[TokenLatent]


class ActivationsOut(BaseModel):
    dictionary: str
    hookpoint: str
    model: str
    tokens: list[TokenActivations]


SteerMode = Literal["add", "clamp", "ablate"]
_VALUE_HELP = ("add: a weight on the strength (default 1; negative steers the other way); clamp: the code the "
               "latent is set to at strength 1 (default 0); ablate: unused")


class SteerEdit(BaseModel):
    model_config = ConfigDict(extra="forbid")
    latent: int = Field(..., ge=0, le=2 ** 31)
    mode: Optional[SteerMode] = Field(None, description="Default: the request's `mode`")
    value: Optional[float] = Field(None, ge=-1e6, le=1e6, description=_VALUE_HELP)


class SteerRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dictionary: str = Field(..., max_length=1000)
    latent: Optional[int] = Field(None, ge=0, le=2 ** 31, description="The latent to steer (or several: `latents`)")
    mode: SteerMode = Field("add", description="add: the unit decoder direction × strength × the median activation "
                                               "norm; clamp: the latent's code set to strength × value at every "
                                               "position; ablate: its direction projected out (any strength but 0)")
    value: Optional[float] = Field(None, ge=-1e6, le=1e6, description=_VALUE_HELP)
    latents: Optional[list[SteerEdit]] = Field(None, min_length=1, max_length=16,
                                               description="Several latents edited at once (instead of `latent`), "
                                                           "each with its own mode and value")
    prompt: str = Field(..., min_length=1, max_length=MAX_PROMPT_CHARS)
    strengths: Optional[list[float]] = Field(None, min_length=1, max_length=8,
                                             description="0 = clean. Default 0, 0.5, 1, 2; for a signed dictionary "
                                                         "both signs: -2, -1, 0, 1, 2; with no add edit 0, 1")
    max_new_tokens: int = Field(24, ge=1, le=64)

    @model_validator(mode="after")
    def _one_target(self):
        if (self.latent is None) == (self.latents is None):
            raise ValueError("give either `latent` or `latents`")
        return self


class SteerCompletion(BaseModel):
    strength: float
    completion: str


class SteerEditOut(BaseModel):
    latent: int
    mode: SteerMode
    value: float


class SteerOut(BaseModel):
    dictionary: str
    latent: Optional[int] = Field(None, description="The latent steered; null when several were (see `edits`)")
    edits: list[SteerEditOut]
    prompt: str
    hookpoint: str
    norm: float
    completions: list[SteerCompletion]


class JobOut(BaseModel):
    id: int
    kind: str
    status: str
    dictionary_pk: Optional[int]
    n_items: int
    created: datetime
    started: Optional[datetime] = None
    finished: Optional[datetime] = None
    error: Optional[str] = None
    budget_usd: Optional[float] = None


class JobStatusOut(BaseModel):
    job_id: int
    status: str
    dictionary: str
    stages: dict[str, dict[str, int]] = Field(..., description="{stage: {item status: count}}")
    spend: dict[str, Any]
    budget_usd: Optional[float]
    latents: int
    latents_finished: int
    rate_per_s: Optional[float]
    eta_s: Optional[float]
    error: Optional[str]
    errors: list[dict[str, Any]]
    extraction: Optional[dict[str, Any]] = Field(None, description="An extracting job's shards: done / total, tokens, "
                                                                   "tokens/s, ETA, per shard")


class JobSubmitted(BaseModel):
    job_id: int
    status: JobStatusOut
    running_here: bool = Field(..., description="True when this server's embedded runner started on it")


class ResumeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    budget_usd: Optional[float] = Field(None, ge=0)


class Health(BaseModel):
    status: Literal["ok"]
    version: str
    database: str
