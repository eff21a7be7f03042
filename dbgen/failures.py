"""Which training failures are worth a retry: ``scale.max_failures`` is for worker deaths, not for errors that
will recur on every attempt.

A worker that raises one of :data:`FATAL_ERRORS` (a bad config, bad data such as a corrupt shard, a damaged or
incompatible checkpoint, a diverged run, a taken metrics port or a full disk) fails the run at once: Ray Train's
default policy would restart the worker group ``max_failures`` times, each attempt failing the same way minutes
later. Everything else (a killed worker, a lost node, an out-of-memory kill) is retried from the last checkpoint
as before.

Ray Train V2 has no public hook for this, so :func:`torch_trainer` builds a ``TorchTrainer`` that hands its
controller a ``FailFastOnFatal`` policy through the trainer's one controller-construction method; on a Ray
version without that method it keeps Ray's default policy and says so.
"""

from __future__ import annotations

import logging

from .config import ConfigError
from .data import DataError
from .resources import HostResourceError
from .rundir import RunError

__all__ = ["FATAL_ERRORS", "TrainingDiverged", "fatal_error", "torch_trainer"]

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """``train.max_bad_steps`` consecutive steps were skipped (non-finite or too large gradient norm)."""


FATAL_ERRORS = (ConfigError, DataError, RunError, TrainingDiverged, HostResourceError)


def fatal_error(error: BaseException) -> BaseException | None:
    """The first worker exception inside a Ray Train ``TrainingFailedError`` that is one of
    :data:`FATAL_ERRORS`, else None."""
    for failure in (getattr(error, "worker_failures", None) or {}).values():
        cause = getattr(failure, "_base_exc", failure)  # Ray wraps it to carry the traceback text
        if isinstance(cause, FATAL_ERRORS):
            return cause
    return None


def _policy_class():
    from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy
    from ray.train.v2._internal.execution.failure_handling.failure_policy import FailureDecision

    class FailFastOnFatal(DefaultFailurePolicy):
        """Ray's default policy, except that a fatal worker error raises at once."""

        def make_decision(self, training_failed_error):
            if fatal_error(training_failed_error) is not None:
                return FailureDecision.RAISE
            return super().make_decision(training_failed_error)

    return FailFastOnFatal


def torch_trainer(*args, **kwargs):
    """A Ray Train ``TorchTrainer(*args, **kwargs)`` whose controller fails fast on :data:`FATAL_ERRORS`."""
    from ray.train.torch import TorchTrainer

    if not hasattr(TorchTrainer, "_initialize_and_run_controller"):
        log.warning(
            "this Ray version has no TorchTrainer._initialize_and_run_controller: fatal errors (bad data, "
            "checkpoint or config) are retried scale.max_failures times like worker deaths"
        )
        return TorchTrainer(*args, **kwargs)

    class DbgenTorchTrainer(TorchTrainer):
        def _initialize_and_run_controller(self, **controller_init_kwargs):
            controller_init_kwargs["failure_policy"] = _policy_class()(self.run_config.failure_config)
            return super()._initialize_and_run_controller(**controller_init_kwargs)

    return DbgenTorchTrainer(*args, **kwargs)
