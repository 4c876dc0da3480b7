"""A cleanup hook: the supervisor calls it after every job, whatever the outcome, even after SIGKILL.

Enable it with ``cleanup = ["examples.hooks:log_outcome"]`` at the top level of the config (every
queue) or in a ``[[queues]]`` table. The supervisor imports hooks itself, so the module must be
importable in the supervisor process: installed, or under the directory ``serve`` runs in.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def log_outcome(job, outcome):
    """Log one line with how the job ended.

    ``job`` is the ``bullmq.Job`` the supervisor processed and ``outcome`` a
    ``sandbox_runtime.JobOutcome``. A sync hook runs in a worker thread and an ``async def`` hook
    on the supervisor's event loop. Either is abandoned after ``supervisor.hook_timeout_s``.
    """
    cause = outcome.cause.value if outcome.cause is not None else "-"
    logger.info(
        "job %s of queue %s (%s): %s, cause %s, last ladder step %s, failedReason %r, %.2f s",
        outcome.job_id, outcome.queue, job.name, outcome.state, cause, outcome.last_step.name,
        outcome.failed_reason, outcome.elapsed_s,
    )
