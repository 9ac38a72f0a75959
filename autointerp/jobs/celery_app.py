"""The Celery app: queues gpu / llm / cpu, one task that is a one-line call into the job seam, and the dispatcher
thread every worker runs (see dispatch.py for the design: the database is the queue's truth, messages are work
tokens).

    autointerp worker --queues llm             # or: celery -A autointerp.jobs.celery_app worker -Q llm
    autointerp job submit spec.json            # the workers' dispatchers see the job within AUTOINTERP_SWEEP_S
    celery -A autointerp.jobs.celery_app flower  # Flower (pip install flower), or the mher/flower image

Broker: `AUTOINTERP_BROKER_URL` (Redis by default; RabbitMQ by amqp:// URL). No result backend: results and
progress live in the store. Delivery settings for long tasks: acks_late (a message is acked when its task ends),
reject_on_worker_lost (a task whose process died goes back to the queue), prefetch 1; the broker's redelivery is
the second line of defence behind the leases.
"""

from __future__ import annotations

import logging

from celery import Celery, signals
from kombu import Queue
from sqlalchemy.exc import InterfaceError, OperationalError

from .dispatch import QUEUES, Dispatcher, WorkerSettings

log = logging.getLogger(__name__)


def make_app(settings: WorkerSettings | None = None) -> Celery:
    s = settings or WorkerSettings.from_env()
    app = Celery("autointerp", broker=s.broker_url, set_as_current=True)
    transport = {"visibility_timeout": s.visibility_timeout}
    if s.broker_url.startswith(("redis://", "rediss://")):
        transport.update(socket_timeout=10, socket_connect_timeout=10, retry_on_timeout=True,
                         health_check_interval=10)
    app.conf.update(
        task_queues=[Queue(s.queue(q), routing_key=s.queue(q)) for q in QUEUES],
        task_default_queue=s.queue("llm"),
        task_default_routing_key=s.queue("llm"),
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        broker_transport_options=transport,
        broker_connection_retry=True,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # a broker restart: reconnect for as long as it takes
        # a task still running when the broker connection drops goes on: its writes are idempotent and what it
        # paid for is kept; its message is gone or redelivered, which the job layer tolerates
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_send_task_events=True,  # Flower
        task_send_sent_event=True,
        worker_hijack_root_logger=False,
    )
    app.autointerp_settings = s
    return app


app = make_app()


# the database briefly unavailable or locked: the task retries with backoff (its leases expire meanwhile)
_TRANSIENT = (OperationalError, InterfaceError, ConnectionError, TimeoutError)


@app.task(name="autointerp.run_batch", bind=True, acks_late=True, reject_on_worker_lost=True,
          autoretry_for=_TRANSIENT, retry_backoff=2, retry_backoff_max=60, retry_jitter=True, max_retries=None)
def run_batch_task(self, job_id: int, queue: str | None = None) -> dict:
    """Claim and run the next latents of job `job_id` — their stages of `queue` (a database error retries with
    backoff)."""
    from .dispatch import run_batch

    return run_batch(job_id, queue, app.autointerp_settings)


_DISPATCHER: list[Dispatcher] = []


@signals.worker_ready.connect
def _start_dispatcher(sender=None, **_):
    if app.autointerp_settings.dispatch and not _DISPATCHER:
        _DISPATCHER.append(Dispatcher(app, app.autointerp_settings).start())
        log.info("autointerp dispatcher started")


@signals.worker_shutdown.connect
def _stop_dispatcher(sender=None, **_):
    while _DISPATCHER:
        _DISPATCHER.pop().stop()


@signals.worker_process_init.connect
def _fresh_engines(**_):
    """A pool child must not use database connections inherited from the parent across fork."""
    from ..store.engine import engine_for

    engine_for.cache_clear()


@signals.after_setup_logger.connect
def _quiet_http(**_):
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per LLM request otherwise


__all__ = ["app", "make_app", "run_batch_task"]
