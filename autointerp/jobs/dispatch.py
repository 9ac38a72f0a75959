"""Jobs on Celery workers: what a task runs, the dispatcher that feeds the queues from the database, the sweeper,
and the limits shared by every worker (LLM endpoint concurrency and rate, the job's budget).

The database is the queue's truth; the broker only carries *work tokens*. A message says "work on job J" and
nothing else: the task claims (leases) the next units of J in the store — while J is extracting, its shards and then
its merge (gpu queue; jobs/extraction.py), after that its latents — and runs the latents with the one worker loop
(`loop.work`, the embedded runner's too: many in flight on one event loop, leases renewed while it works), stopping
after `task_latents` latents. So:

* fan-out of a million latents is a handful of small messages: the dispatcher keeps `queue_depth` tokens waiting
  per active job and per dispatcher, whatever the job's size; nothing pages a million signatures into memory;
* a broker that loses everything (Redis here keeps nothing on disk, or a restart) loses nothing of value: the
  dispatcher sees an empty queue and queues tokens again;
* a worker killed with SIGKILL holds leases that expire after `lease_s` (renewed every lease_s/3 while alive); the
  sweeper (the same dispatcher loop) puts those items back to pending and other workers' tokens take them — long
  before the broker's own redelivery (Redis' visibility timeout, an hour by default), which stays a second line;
* a late duplicate (the killed worker's message redelivered, a slow worker finishing after its lease ran out)
  writes nothing twice: results are insert-or-ignore on their identity.

Every worker process runs a dispatcher thread (in Celery's main process, not in the pool's children), so there is
no single point of failure; with several workers the queue holds up to `queue_depth` × (number of workers) tokens
per job, still bounded. A token that finds no work returns at once.

Routing by stage: the scorers that need the subject model (intervention, surprisal) run on `gpu`, the embedding
scorer on `cpu`, the other scorers on `llm`; the explanation runs on the job's main queue (`llm` when anything calls
an LLM). A queue's share of a latent is claimable once the latent's explanation is finished (`Store.claim_stages`);
a failed explanation fails the latent's items on the other queues (`Store.fail_orphans`), so a job never waits on
work that cannot start. A job whose stages all live on one queue is claimed latent by latent (`claim_latents`).
A queue nobody consumes holds its share of a job back (the job stays `running`): run workers on every queue the
jobs use (`autointerp worker --queues llm,cpu` is the default).

Shared limits (need Redis: `AUTOINTERP_REDIS_URL`, by default the broker when it is Redis): every request to an
LLM endpoint (base URL) takes a slot of a Redis semaphore (`AUTOINTERP_LLM_MAX_IN_FLIGHT` for all workers
together; slots of a killed worker expire) and a token of a Redis token bucket (`AUTOINTERP_LLM_RATE` requests/s),
around each HTTP attempt (not around the backoff sleeps). A Redis that is down does not stop the work: the limits
fall back to each process's own. The budget: each worker adds what a latent cost to a Redis counter per job
(initialised from the store's sum, the truth, when missing) and checks it before claiming; past the budget the job
becomes `budget_exhausted` and no worker claims more; `autointerp job resume ID --budget B` continues it. Without
Redis the check reads the store's sum (cached for a few seconds).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from ..errors import AutointerpError, ConfigError
from ..explainers import LLM_EXPLAINERS
from ..llm.base import PermanentLLMError
from ..store import Store, open_store
from .spec import STAGE_EXPLAIN, JobSpec, parse_job_spec, score_stage

log = logging.getLogger(__name__)

DEFAULT_BROKER = "redis://127.0.0.1:6379/0"
QUEUES = ("gpu", "llm", "cpu")
TASK = "autointerp.run_batch"
ACTIVE = ("pending", "running")
GPU_SCORERS = {"intervention", "surprisal"}
CPU_SCORERS = {"embedding"}

# every environment variable of the queue layer: name -> (default, meaning); the README's table lists them
ENV: dict[str, tuple[str, str]] = {
    "AUTOINTERP_BROKER_URL": (DEFAULT_BROKER, "Celery broker: redis://HOST:PORT/DB or amqp://USER:PASS@HOST:5672//"),
    "AUTOINTERP_REDIS_URL": ("the broker, when Redis", "Redis for the limits shared by all workers (LLM "
                             "concurrency and rate per endpoint, budget counters); 'off' disables them"),
    "AUTOINTERP_LEASE_S": ("60", "Seconds a worker's claim on a latent lasts without renewal (renewed every third of "
                           "it); a killed worker's latents run again after at most this"),
    "AUTOINTERP_TASK_LATENTS": ("64", "Latents one task runs before it returns (its message is acked)"),
    "AUTOINTERP_QUEUE_DEPTH": ("4", "Messages each dispatcher keeps waiting per active job"),
    "AUTOINTERP_SWEEP_S": ("2", "Dispatcher period: sweep expired leases, refill the queue, finish jobs"),
    "AUTOINTERP_QUEUE_PREFIX": ("", "Prefix of the queue names (several deployments on one broker)"),
    "AUTOINTERP_DISPATCH": ("1", "0: this worker runs no dispatcher thread"),
    "AUTOINTERP_LLM_MAX_IN_FLIGHT": ("0", "Requests in flight per LLM endpoint across all workers (0: no shared "
                                     "limit; each process still keeps the job's llm.concurrency)"),
    "AUTOINTERP_LLM_RATE": ("0", "Requests per second per LLM endpoint across all workers (0: no limit)"),
    "AUTOINTERP_VISIBILITY_TIMEOUT": ("3600", "Redis broker: seconds before an unacked message is delivered again "
                                      "(a second line; leases recover a killed worker's work first)"),
}


def _env(name: str) -> str:
    return os.environ.get(name, ENV[name][0])


@dataclass
class WorkerSettings:
    broker_url: str = DEFAULT_BROKER
    redis_url: str | None = None
    lease_s: float = 60.0
    task_latents: int = 64
    queue_depth: int = 4
    sweep_s: float = 2.0
    queue_prefix: str = ""
    dispatch: bool = True
    llm_max_in_flight: int = 0
    llm_rate: float = 0.0
    visibility_timeout: int = 3600

    @classmethod
    def from_env(cls) -> "WorkerSettings":
        broker = os.environ.get("AUTOINTERP_BROKER_URL") or DEFAULT_BROKER
        redis_url = os.environ.get("AUTOINTERP_REDIS_URL")
        if redis_url is None:
            redis_url = broker if broker.startswith(("redis://", "rediss://")) else None
        elif redis_url.strip().lower() in ("", "off", "none", "0"):
            redis_url = None

        def num(name, kind, lo):
            raw = _env(name)
            try:
                v = kind(raw)
            except ValueError:
                raise ConfigError(f"{name}={raw!r}: expected a number") from None
            if v < lo:
                raise ConfigError(f"{name}={raw!r}: expected a number >= {lo}")
            return v

        return cls(broker_url=broker, redis_url=redis_url, lease_s=num("AUTOINTERP_LEASE_S", float, 1),
                   task_latents=num("AUTOINTERP_TASK_LATENTS", int, 1),
                   queue_depth=num("AUTOINTERP_QUEUE_DEPTH", int, 1), sweep_s=num("AUTOINTERP_SWEEP_S", float, 0.05),
                   queue_prefix=_env("AUTOINTERP_QUEUE_PREFIX"), dispatch=_env("AUTOINTERP_DISPATCH") != "0",
                   llm_max_in_flight=num("AUTOINTERP_LLM_MAX_IN_FLIGHT", int, 0),
                   llm_rate=num("AUTOINTERP_LLM_RATE", float, 0),
                   visibility_timeout=num("AUTOINTERP_VISIBILITY_TIMEOUT", int, 1))

    def queue(self, name: str) -> str:
        return f"{self.queue_prefix}{name}"


def stage_queue(spec: JobSpec, stage: str) -> str:
    """The queue of one stage: scorers that need the subject model -> gpu, the embedding scorer -> cpu, other
    scorers -> llm; the explanation goes with the job's main queue (llm when anything calls an LLM, else gpu when a
    gpu scorer needs it, else cpu), so a baseline explainer's work runs where its scorers are."""
    if stage == STAGE_EXPLAIN:
        scorer_queues = {stage_queue(spec, score_stage(n)) for n in spec.scorers}
        if spec.explainer in LLM_EXPLAINERS or "llm" in scorer_queues:
            return "llm"
        return "gpu" if "gpu" in scorer_queues else "cpu"
    name = stage.split(":", 1)[1]
    return "gpu" if name in GPU_SCORERS else "cpu" if name in CPU_SCORERS else "llm"


def queue_plan(spec: dict | Any) -> dict[str, tuple[list[str], bool]]:
    """{queue: (its stages of the job, whether they wait for the explanation made on another queue)}."""
    spec = parse_job_spec(spec)
    plan: dict[str, list[str]] = {}
    for stage in spec.stages():
        plan.setdefault(stage_queue(spec, stage), []).append(stage)
    return {q: (stages, STAGE_EXPLAIN not in stages) for q, stages in plan.items()}


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


# ----------------------------------------------------------------------------------------------- redis (shared)

_REDIS: dict[str, Any] = {}


def sync_redis(url: str | None):
    """One synchronous Redis client per URL and process (None without a URL)."""
    if not url:
        return None
    if url not in _REDIS:
        import redis

        _REDIS[url] = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5,
                                           health_check_interval=30)
    return _REDIS[url]


_SEM_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
  redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[2])) + 60)
  return 1
end
return 0
"""

_BUCKET_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(b[1]) or burst
local ts = tonumber(b[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / rate end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('EXPIRE', KEYS[1], 3600)
return tostring(wait)
"""

_INCR_IF_EXISTS = """
if redis.call('EXISTS', KEYS[1]) == 1 then return redis.call('INCRBYFLOAT', KEYS[1], ARGV[1]) end
return false
"""


class SharedEndpointLimit:
    """Concurrency slots and a request rate for one LLM endpoint, shared through Redis by every worker process.

    Wraps the backend's per-process endpoint (`OpenAIBackend._endpoint`: its `semaphore()` is entered around each
    HTTP attempt), so an attempt first takes the process's own slot, then a shared slot, then a rate token. Slots
    carry an expiry (the backend's timeout + 30 s): a killed worker's slots free themselves."""

    def __init__(self, local, redis_client, base_url: str, max_in_flight: int, rate: float, hold_s: float,
                 prefix: str = ""):
        self.local = local
        self.limit = getattr(local, "limit", None)
        self.base_url = base_url
        self.redis = redis_client
        self.max_in_flight = max_in_flight
        self.rate = rate
        self.hold_s = hold_s
        self.key = f"autointerp:{prefix}llm:{base_url}"
        self.down_until = 0.0

    def semaphore(self):
        return _SharedSlot(self)


class _SharedSlot:
    def __init__(self, ep: SharedEndpointLimit):
        self.ep = ep
        self.token: str | None = None
        self.local = None

    async def __aenter__(self):
        self.local = self.ep.local.semaphore()
        await self.local.__aenter__()
        try:
            await self._shared()
        except BaseException:
            await self.local.__aexit__(None, None, None)
            raise
        return self

    async def _shared(self) -> None:
        ep = self.ep
        if time.monotonic() < ep.down_until:
            return
        try:
            if ep.max_in_flight > 0:
                token = uuid.uuid4().hex
                delay = 0.005
                while not await asyncio.to_thread(ep.redis.eval, _SEM_ACQUIRE, 1, ep.key + ":slots",
                                                  ep.max_in_flight, ep.hold_s, token):
                    await asyncio.sleep(delay)
                    delay = min(0.1, delay * 1.5)
                self.token = token
            if ep.rate > 0:
                while True:
                    wait = float(await asyncio.to_thread(ep.redis.eval, _BUCKET_TAKE, 1, ep.key + ":rate", ep.rate,
                                                         max(1.0, ep.rate / 10)))
                    if wait <= 0:
                        break
                    await asyncio.sleep(wait)
        except Exception as e:  # Redis down: each process's own limit still applies; try Redis again in 10 s
            log.warning("shared LLM limit for %s unavailable (%s); using this process's limit only", ep.base_url, e)
            ep.down_until = time.monotonic() + 10.0
            await self._release()

    async def _release(self) -> None:
        token, self.token = self.token, None
        if token is not None:
            try:
                await asyncio.to_thread(self.ep.redis.zrem, self.ep.key + ":slots", token)
            except Exception:
                pass  # it expires

    async def __aexit__(self, *exc):
        try:
            await asyncio.shield(self._release())
        finally:
            await self.local.__aexit__(*exc)


def share_limits(clients, settings: WorkerSettings) -> None:
    """Put the shared per-endpoint limits around every OpenAI-compatible client's HTTP attempts (no-op without
    Redis or without limits)."""
    if not (settings.llm_max_in_flight or settings.llm_rate):
        return
    r = sync_redis(settings.redis_url)
    if r is None:
        return
    for c in {id(c): c for c in clients if c is not None}.values():
        backend = getattr(c, "backend", None)
        ep = getattr(backend, "_endpoint", None)
        if ep is None or isinstance(ep, SharedEndpointLimit):
            continue
        backend._endpoint = SharedEndpointLimit(ep, r, backend.base_url, settings.llm_max_in_flight,
                                                settings.llm_rate, float(getattr(backend, "timeout", 60.0)) + 30.0,
                                                settings.queue_prefix)


class Budget:
    """A job's spend as every worker sees it: a Redis counter (initialised from the store's sum when missing;
    workers add each latent's cost), or the store's sum cached for `cache_s` without Redis."""

    def __init__(self, store: Store, job_id: int, settings: WorkerSettings, cache_s: float = 3.0):
        self.store, self.job_id, self.cache_s = store, job_id, cache_s
        self.redis = sync_redis(settings.redis_url)
        self.key = f"autointerp:{settings.queue_prefix}job:{job_id}:spend"
        self._cached: tuple[float, float] | None = None  # (time, value)
        self._local = 0.0  # added since the cached value (no Redis)

    def spent(self) -> float:
        if self.redis is not None:
            try:
                v = self.redis.get(self.key)
                if v is None:
                    total = self.store.job_spend(self.job_id)["cost_usd"]
                    self.redis.set(self.key, repr(total), nx=True)
                    v = self.redis.get(self.key)
                return float(v)
            except Exception as e:
                log.warning("budget counter in Redis unavailable (%s); reading the store", e)
        now = time.monotonic()
        if self._cached is None or now - self._cached[0] > self.cache_s:
            self._cached = (now, self.store.job_spend(self.job_id)["cost_usd"])
            self._local = 0.0
        return self._cached[1] + self._local

    def add(self, cost: float) -> None:
        if cost <= 0:
            return
        self._local += cost
        if self.redis is not None:
            try:
                self.redis.eval(_INCR_IF_EXISTS, 1, self.key, repr(float(cost)))
            except Exception:
                pass  # the store has it; the counter is rebuilt from it when missing


# ----------------------------------------------------------------------------------------------- the task


@dataclass
class BatchResult:
    job_id: int
    latents: int = 0
    failed: int = 0
    stopped_by: str | None = None
    cost_usd: float = 0.0
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def run_batch(job_id: int, queue: str | None = None, settings: WorkerSettings | None = None,
              store: Store | None = None) -> dict:
    """What one Celery task runs: claim and run up to `task_latents` latents of the job (the job's `concurrency`
    in flight) — their stages that belong to `queue` (all stages when None) — then return. Safe to run anywhere,
    any number of times."""
    settings = settings or WorkerSettings.from_env()
    store = store or open_store()
    return asyncio.run(run_batch_async(store, job_id, settings, queue=queue)).as_dict()


async def run_batch_async(store: Store, job_id: int, settings: WorkerSettings, worker: str | None = None,
                          queue: str | None = None) -> BatchResult:
    from .loop import work
    from .runner import job_context

    res = BatchResult(job_id)
    job = await asyncio.to_thread(store.job, job_id)
    if job["status"] not in ACTIVE:
        res.stopped_by = job["status"]
        return res
    worker = worker or worker_name()
    if job["dictionary_pk"] is None:  # the extraction stage: shards and the merge run on the gpu queue
        if queue not in (None, "gpu"):
            return res
        from .extraction import run_extraction_units

        try:
            finished = await asyncio.to_thread(run_extraction_units, store, job_id, worker, settings.lease_s)
        except AutointerpError as e:
            await _stop(store, job_id, "stopped", error=f"{type(e).__name__}: {e}"[:2000])
            res.stopped_by = f"{type(e).__name__}: {e}"
            return res
        await asyncio.to_thread(store.set_job_status_from, job_id, ("pending",), "running", start=True)
        if not finished:
            return res  # other workers hold the remaining shards
        job = await asyncio.to_thread(store.job, job_id)
    budget_usd = job["budget_usd"]
    budget = Budget(store, job_id, settings) if budget_usd is not None else None
    if budget is not None and await asyncio.to_thread(budget.spent) >= budget_usd:
        await _stop(store, job_id, "budget_exhausted")
        res.stopped_by = "budget_exhausted"
        return res
    plan = queue_plan(job["spec"])
    if queue is not None and queue not in plan:
        return res
    if queue is None or len(plan) == 1:  # this queue has all the job's stages
        def claim():
            return store.claim_latents(job_id, worker, 1, settings.lease_s)
    else:
        stages, after_explain = plan[queue]

        def claim():
            return store.claim_stages(job_id, worker, 1, settings.lease_s, stages, after_explain)
    ctx = await asyncio.to_thread(job_context, store, job)
    await asyncio.to_thread(store.set_job_status_from, job_id, ("pending",), "running", start=True)
    out = await work(store, job_id, ctx, claim=claim, worker=worker, lease_s=settings.lease_s, budget=budget,
                     budget_usd=budget_usd, settings=settings, max_latents=settings.task_latents)
    res.latents, res.failed, res.cost_usd, res.errors = out.latents, out.failed, out.usage.cost_usd, out.errors
    error = out.error
    if isinstance(error, (PermanentLLMError, AutointerpError)):
        # the job cannot go on (bad credentials, unknown model, bad input): it stops with the reason, like the
        # embedded runner; `autointerp job resume` after fixing it
        await _stop(store, job_id, "stopped", error=f"{type(error).__name__}: {error}"[:2000])
        res.stopped_by = f"{type(error).__name__}: {error}"
        return res
    if error is not None:
        raise error  # database unavailable and the like: the Celery task retries; leases expire meanwhile
    if out.stopped_by:
        res.stopped_by = out.stopped_by
        if out.stopped_by == "budget_exhausted":
            await _stop(store, job_id, "budget_exhausted")
    return res


async def _stop(store: Store, job_id: int, status: str, error: str | None = None) -> None:
    from ..store.tables import utcnow

    await asyncio.to_thread(store.set_job_status_from, job_id, ACTIVE, status, finished=utcnow(), error=error)


# ----------------------------------------------------------------------------------------------- the dispatcher


class Dispatcher:
    """Feeds the queues from the database, sweeps expired leases, finishes jobs. `step()` is one round; `run()`
    loops until `stop()`. Needs a Celery app (to publish and to count waiting messages)."""

    def __init__(self, app, settings: WorkerSettings | None = None, store: Store | None = None):
        self.app = app
        self.settings = settings or WorkerSettings.from_env()
        self._store = store
        self._stop = threading.Event()
        self.thread: threading.Thread | None = None
        self.rounds = 0
        self.sent = 0
        self.swept = 0

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = open_store()
        return self._store

    def waiting(self, queue: str) -> int:
        """Messages waiting in a queue (not counting those a worker holds)."""
        q = self.app.amqp.queues[queue] if queue in self.app.amqp.queues else None
        with self.app.connection_for_read() as conn:
            chan = conn.default_channel
            if q is None:
                from kombu import Queue

                q = Queue(queue, routing_key=queue)
            return int(q.bind(chan).queue_declare().message_count)

    def step(self) -> dict:
        store = self.store
        jobs = store.active_jobs()
        per_queue: dict[str, list[int]] = {}
        finished = {}
        for job in jobs:  # reads first: a write transaction (SQLite's one lock) only when there is something to do
            if store.has_expired_leases(job["id"]):
                self.swept += store.requeue_expired(job["id"])
            if not store.has_items(job["id"], ACTIVE):
                done = store.finish_job_if_complete(job["id"])
                if done is not None:
                    finished[job["id"]] = done
                continue
            if job["dictionary_pk"] is None:  # extracting: the gpu queue's shards and merge
                bad = store.failed_unit(job["id"])
                if bad is not None:
                    store.set_job_status_from(job["id"], ACTIVE, "stopped", error=bad[:2000])
                elif store.has_pending_units(job["id"]):
                    per_queue.setdefault("gpu", []).append(job["id"])
                continue
            try:
                plan = queue_plan(job["spec"])
            except ConfigError as e:
                store.set_job_status_from(job["id"], ACTIVE, "stopped", error=str(e)[:2000])
                continue
            if len(plan) == 1:
                (q,) = plan
                if store.has_items(job["id"], ("pending",)):
                    per_queue.setdefault(q, []).append(job["id"])
                continue  # all leased: nothing to hand out until a lease is finished or expires
            store.fail_orphans(job["id"])  # a failed explanation: its other queues' items can never run
            for q, (stages, after_explain) in plan.items():
                if store.has_claimable(job["id"], stages, after_explain):
                    per_queue.setdefault(q, []).append(job["id"])
        sent = 0
        for q, ids in per_queue.items():
            queue = self.settings.queue(q)
            want = self.settings.queue_depth * len(ids) - self.waiting(queue)
            for i in range(max(0, want)):
                self.app.send_task(TASK, args=[ids[i % len(ids)], q], queue=queue, routing_key=queue)
                sent += 1
        self.sent += sent
        self.rounds += 1
        return {"jobs": len(jobs), "sent": sent, "finished": finished}

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                self.step()
            except Exception as e:  # broker or database down: try again next round
                log.warning("dispatcher: %s: %s", type(e).__name__, e)
            self._stop.wait(self.settings.sweep_s)

    def start(self) -> "Dispatcher":
        self.thread = threading.Thread(target=self.run, name="autointerp-dispatcher", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self.thread is not None:
            self.thread.join(timeout=10)


__all__ = ["WorkerSettings", "ENV", "QUEUES", "queue_plan", "stage_queue", "run_batch", "run_batch_async", "Dispatcher",
           "Budget",
           "SharedEndpointLimit", "share_limits"]
