"""The tasks, one line each into the job seam (registered on autointerp.jobs.celery_app.app):

    autointerp.run_batch(job_id)  ->  autointerp.jobs.dispatch.run_batch(job_id)
        claim the job's next latents in the store (leases), run them with jobs.units.run_latent, return.
"""

from autointerp.jobs.celery_app import run_batch_task  # noqa: F401

__all__ = ["run_batch_task"]
