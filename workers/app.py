"""`celery -A workers.app worker|flower|inspect …` from the repository root: the Celery app lives in the package
(autointerp.jobs.celery_app) so that `autointerp worker` works wherever autointerp is installed."""

from autointerp.jobs.celery_app import app, run_batch_task  # noqa: F401

__all__ = ["app", "run_batch_task"]
