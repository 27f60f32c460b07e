"""Batch jobs. The public entry for other layers (see docs/JOBS.md):

- ``JobIntake``: submit a job from plain values (a request mapping, an upload stream, the
  owner) and control it (pause, resume, cancel);
- ``JobReader``: jobs, items, manifests and results, filtered by owner;
- ``ManifestRecord``: the one shape of a finished item's record;
- ``start_manager``: create the job actor as a server starts; ``manager_name`` and
  ``NAMESPACE`` find it (the model replicas read its backlog);
- ``webhook_secret_for``: the secret that signs a key's callbacks (for its holder);
- ``run_job``: run (or resume) one folder or prefix job in this process, through the
  application's handle (``python -m serve_app.cli.run``, a Ray job's command).
"""

from serve_app.jobs.intake import JobIntake, JobRequest, Presets
from serve_app.jobs.manager import NAMESPACE, manager_name, start_manager
from serve_app.jobs.manifest import ManifestRecord
from serve_app.jobs.reader import JobReader
from serve_app.jobs.runner import run_job
from serve_app.jobs.webhooks import secret_for as webhook_secret_for

__all__ = [
    "NAMESPACE",
    "JobIntake",
    "JobReader",
    "JobRequest",
    "ManifestRecord",
    "Presets",
    "manager_name",
    "run_job",
    "start_manager",
    "webhook_secret_for",
]
