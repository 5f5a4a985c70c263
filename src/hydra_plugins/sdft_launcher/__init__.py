"""Hydra's basic (local, one-after-another) launcher, except that a trial whose config
cannot be composed is recorded as a failed trial instead of ending the whole sweep.

An Optuna search space may hold a value that names no option (`lr_scheduler=choice(cosine,
constant,nosuch)`): Hydra fails to compose that trial inside `launch`, before any job runs,
and the exception would stop the sweep with the trials so far unsummarised. Here that trial
gets a `trial.json` like any failed run, Optuna is told it failed, and the search goes on.
(Hydra loads launchers only from the `hydra_plugins` package, hence this small module.)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from hydra._internal.core_plugins.basic_launcher import BasicLauncher
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import ConfigCompositionException

from sdft.files import write_atomic

log = logging.getLogger(__name__)


class TrialRecordingLauncher(BasicLauncher):
    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        returns = []
        for i, overrides in enumerate(job_overrides):
            try:
                returns += super().launch([overrides], initial_job_idx + i)
            except ConfigCompositionException as e:
                returns.append(self.record_failure(list(overrides), initial_job_idx + i, e))
        return returns

    def record_failure(self, overrides: list[str], job: int, error: Exception) -> JobReturn:
        """Write the trial's record where its folder would be; return a failed JobReturn."""
        message = f"{type(error).__name__}: {error}"
        log.error("trial %d (%s) failed: %s; the sweep goes on", job, " ".join(overrides), message)
        folder = Path(str(self.config.hydra.sweep.dir)) / str(job)
        record = {"job": job, "overrides": overrides, "status": "failed", "error": message}
        write_atomic(folder / "trial.json", json.dumps(record, indent=1))
        return JobReturn(
            overrides=overrides,
            working_dir=str(folder),
            status=JobStatus.FAILED,
            _return_value=error,
        )
