"""A trial's worker killed by Ray's memory monitor, as the trial failure it is.

When a node runs low on memory, Ray's memory monitor kills a worker, and the trial's task that ran there fails
with ray.exceptions.OutOfMemoryError. Ray Tune's actor manager (ray.air.execution._internal.actor_manager,
RayActorManager._actor_task_failed) expects only RayActorError (the actor died) or RayTaskError (the task raised)
from a trial's task and raises a RuntimeError on anything else, which ends the sweep's driver with a traceback
instead of failing the one trial. Passed on as the actor's death, the kill is a failure that Tune retries from
the trial's last checkpoint, up to FailureConfig's max_failures, and then ends the trial as errored.

Such a trial, like any whose worker died on its last try, is marked ERROR in Tune's memory but not in the
experiment state it saves (TuneController._schedule_trial_stop returns before it marks the trial for saving where
the trial's actor is gone already), so the saved state kept it RUNNING: the end of the sweep and the analysis
then read an interrupted trial, and a --resume would run it again. The trial is saved once it is stopped.

Ray is imported at the top: only a driver that runs Ray imports this module.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from ray.exceptions import OutOfMemoryError, RayActorError

TUNE_CONTROLLER_LOGGER = "ray.tune.execution.tune_controller"  # logs each failed try of a trial


class KilledForMemory(RayActorError, OutOfMemoryError):
    """A trial's worker killed by Ray's memory monitor: the actor's death (what Tune retries), with Ray's message."""

    def __init__(self, message: str):
        super().__init__(error_msg=message)
        self.message = message  # what OutOfMemoryError keeps


@contextmanager
def memory_kills_as_trial_failures() -> Iterator[None]:
    """For the block, a trial killed for memory fails, is retried and at last ends as errored, in Tune's saved state
    too (see the module's docstring), and Tune logs each try killed for memory in a few lines, without a traceback."""
    undo = [_pass_memory_kills_as_actor_deaths(), _save_stopped_trials()]
    logger = logging.getLogger(TUNE_CONTROLLER_LOGGER)
    logger.addFilter(memory_kills_without_traceback)
    try:
        yield
    finally:
        logger.removeFilter(memory_kills_without_traceback)
        for restore in undo:
            restore()


def _pass_memory_kills_as_actor_deaths() -> Callable[[], None]:
    """Make Tune's actor manager see a task's OutOfMemoryError as a KilledForMemory actor death; returns the undo."""
    from ray.air.execution._internal.actor_manager import RayActorManager

    original = RayActorManager._actor_task_failed

    def task_failed(manager: RayActorManager, tracked_actor_task, exception: Exception) -> None:
        if isinstance(exception, OutOfMemoryError) and not isinstance(exception, RayActorError):
            exception = KilledForMemory(str(exception))
        original(manager, tracked_actor_task, exception)

    RayActorManager._actor_task_failed = task_failed
    return lambda: setattr(RayActorManager, "_actor_task_failed", original)


def _save_stopped_trials() -> Callable[[], None]:
    """Make Tune save a trial's state whenever it stops the trial, its actor gone or not; returns the undo."""
    from ray.tune.execution.tune_controller import TuneController

    original = TuneController._schedule_trial_stop

    def schedule_trial_stop(controller: TuneController, trial, exception: Exception | None = None) -> None:
        original(controller, trial, exception)
        controller._mark_trial_to_checkpoint(trial)

    TuneController._schedule_trial_stop = schedule_trial_stop
    return lambda: setattr(TuneController, "_schedule_trial_stop", original)


def memory_kills_without_traceback(record: logging.LogRecord) -> bool:
    """Tune logs a failed try of a trial with the error's traceback, which for a kill by Ray's memory monitor shows
    only Ray's own calls: the log keeps the first two lines of Ray's report (the node's memory, why it killed),
    and the whole report stays in the trial's error.txt."""
    error = record.exc_info[1] if record.exc_info else None
    if killed_for_memory(error):
        summary = " ".join(str(error).strip().splitlines()[:2])
        record.msg, record.args = f"{record.getMessage()}: killed for memory: {summary} (Ray's report: error.txt in its folder)", ()
        record.exc_info, record.exc_text = None, None
    return True


def killed_for_memory(error: BaseException | None) -> bool:
    """Whether a trial's error (a Tune Result's `.error`) is Ray's memory monitor killing its worker."""
    return isinstance(error, OutOfMemoryError)
