"""Jobs: the one seam where the CLI, the Celery workers and the API meet.

    spec = JobSpec(dictionary="runs/l15", latents="0-99", explainer_model="openai:M@URL", scorers=["detection"])
    job_id = submit(store, spec)          # validated, items written; an identical spec resumes its job
    run(store, job_id)                    # the embedded runner (Celery workers run the same units)
    status(store, job_id)                 # counts per stage, spend, rate, ETA
"""

from .context import JobContext, load_context
from .runner import (JobStatus, JobSummary, cancel, ensure_dictionary, job_context, resume, retry_failed, run,
                     run_embedded, status, submit)
from .spec import ExtractionSpec, JobSpec, LLMSettings, parse_job_spec
from .units import run_latent

__all__ = ["JobSpec", "ExtractionSpec", "LLMSettings", "parse_job_spec", "submit", "run", "run_embedded", "status", "cancel",
           "resume", "retry_failed", "JobStatus", "JobSummary", "JobContext", "load_context", "run_latent",
           "ensure_dictionary", "job_context"]
