"""The cancellation ladder of one job: cooperative cancel, then SIGTERM, then SIGKILL.

The ladder is a state machine over stored deadlines. It never sleeps: its driver calls ``advance()``
whenever something happens or a deadline returned by ``next_deadline()`` passes, and the ladder
performs every step that is due through a ``LadderActions`` object. Tests drive it with a fake
clock and a recorder of actions.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol


class CancelCause(enum.Enum):
    """The reason class of a cancel request."""

    USER = "user"
    TIMEOUT = "timeout"
    LOCK_LOST = "lock lost"
    SHUTDOWN = "shutdown"
    MEMORY = "memory"
    CPU = "cpu time"


class Step(enum.IntEnum):
    """How far the ladder has gone. Steps only move forward."""

    RUNNING = 0
    COOPERATIVE = 1
    SIGTERM = 2
    SIGKILL = 3


# The first step of the ladder for each cause. A tree over its memory budget cannot be trusted to
# clean up (it may allocate more while doing so), so it goes straight to SIGKILL.
FIRST_STEP = {
    CancelCause.USER: Step.COOPERATIVE,
    CancelCause.TIMEOUT: Step.COOPERATIVE,
    CancelCause.LOCK_LOST: Step.COOPERATIVE,
    CancelCause.SHUTDOWN: Step.COOPERATIVE,
    CancelCause.CPU: Step.COOPERATIVE,
    CancelCause.MEMORY: Step.SIGKILL,
}

# When a second request arrives with another cause, the stronger cause decides the outcome.
# A lost lock forbids any write, so it beats everything; a user's cancel beats the shutdown that
# would otherwise hand the job back.
CAUSE_STRENGTH = {
    CancelCause.SHUTDOWN: 0,
    CancelCause.TIMEOUT: 1,
    CancelCause.CPU: 2,
    CancelCause.MEMORY: 3,
    CancelCause.USER: 4,
    CancelCause.LOCK_LOST: 5,
}


@dataclass(frozen=True)
class EscalationPolicy:
    """The grace periods between steps, in seconds."""

    cancel_grace_s: float
    term_grace_s: float

    def __post_init__(self) -> None:
        for name in ("cancel_grace_s", "term_grace_s"):
            value = getattr(self, name)
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value!r}")


class LadderActions(Protocol):
    """The operations the ladder performs on a child. The supervisor implements them; tests fake them."""

    def deliver_cancel(self, reason: str) -> None: ...

    def terminate_tree(self) -> None: ...

    def kill_tree(self) -> None: ...


@dataclass(frozen=True)
class StepTaken:
    step: Step
    at: float  # clock time
    elapsed_s: float  # since the first request


@dataclass
class Ladder:
    policy: EscalationPolicy
    actions: LadderActions
    clock: Callable[[], float] = time.monotonic
    step: Step = Step.RUNNING
    cause: CancelCause | None = None
    reason: str = ""
    requested_at: float | None = None
    exited: bool = False
    history: list[StepTaken] = field(default_factory=list)
    _deadline: float | None = None

    @property
    def requested(self) -> bool:
        return self.cause is not None

    @property
    def last_step(self) -> Step:
        return self.step

    def request(self, cause: CancelCause, reason: str) -> bool:
        """Ask the job to stop; return True when this request changed the cause or the step.

        The first request starts the clock. A later one can only strengthen the cause (see
        CAUSE_STRENGTH) or move the ladder to an earlier-due step; it never restarts a grace period.
        """
        now = self.clock()
        changed = False
        if self.cause is None or CAUSE_STRENGTH[cause] > CAUSE_STRENGTH[self.cause]:
            self.cause = cause
            self.reason = reason
            changed = True
        if self.requested_at is None:
            self.requested_at = now
        if not self.exited and FIRST_STEP[cause] > self.step:
            self._take(FIRST_STEP[cause], now)
            changed = True
        return changed

    def escalate_now(self) -> None:
        """Skip to SIGKILL at once (a second shutdown signal)."""
        if self.exited or self.step >= Step.SIGKILL:
            return
        if self.requested_at is None:
            self.requested_at = self.clock()
        self._take(Step.SIGKILL, self.clock())

    def advance(self) -> None:
        """Take every step whose deadline has passed.

        Each grace period counts from the moment its step was taken. A driver that wakes late
        therefore delays the later steps too, and never sends SIGTERM and SIGKILL back to back
        unless ``term_grace_s`` is 0.
        """
        now = self.clock()
        while not self.exited and self._deadline is not None and now >= self._deadline:
            self._take(Step(self.step + 1), now)

    def next_deadline(self) -> float | None:
        """Clock time at which ``advance`` has work to do, or None."""
        return None if self.exited else self._deadline

    def mark_exited(self) -> None:
        """Record that the job's process is gone, so no further step is taken."""
        self.exited = True
        self._deadline = None

    def _take(self, step: Step, due: float) -> None:
        # Steps are taken in order, so a jump from RUNNING to SIGKILL skips the cooperative and
        # SIGTERM steps entirely rather than running them back to back.
        self.step = step
        if step == Step.COOPERATIVE:
            self.actions.deliver_cancel(self.reason)
            self._deadline = due + self.policy.cancel_grace_s
        elif step == Step.SIGTERM:
            self.actions.terminate_tree()
            self._deadline = due + self.policy.term_grace_s
        elif step == Step.SIGKILL:
            self.actions.kill_tree()
            self._deadline = None
        assert self.requested_at is not None
        self.history.append(StepTaken(step, due, due - self.requested_at))
