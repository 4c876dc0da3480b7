"""The cancellation ladder as a pure state machine, driven by a fake clock and a recorder of actions."""

from __future__ import annotations

import itertools
import random

import pytest

from sandbox_runtime.ladder import (
    CAUSE_STRENGTH,
    FIRST_STEP,
    CancelCause,
    EscalationPolicy,
    Ladder,
    Step,
)

CANCEL_GRACE_S = 10.0
TERM_GRACE_S = 5.0
START_TIME = 1000.0

DELIVER = "deliver_cancel"
TERMINATE = "terminate_tree"
KILL = "kill_tree"


class FakeClock:
    """A monotonic clock that moves only when a test sets or advances it."""

    def __init__(self, now: float = START_TIME) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class ActionRecorder:
    """LadderActions that record each call with the clock time it happened at."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.calls: list[tuple[str, float]] = []
        self.reasons: list[str] = []

    def deliver_cancel(self, reason: str) -> None:
        self.calls.append((DELIVER, self.clock()))
        self.reasons.append(reason)

    def terminate_tree(self) -> None:
        self.calls.append((TERMINATE, self.clock()))

    def kill_tree(self) -> None:
        self.calls.append((KILL, self.clock()))

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


def make_ladder(cancel_grace_s: float = CANCEL_GRACE_S, term_grace_s: float = TERM_GRACE_S) -> tuple[Ladder, FakeClock, ActionRecorder]:
    clock = FakeClock()
    actions = ActionRecorder(clock)
    ladder = Ladder(EscalationPolicy(cancel_grace_s, term_grace_s), actions, clock=clock)
    return ladder, clock, actions


# -- the path from RUNNING to SIGKILL ----------------------------------------------------------------


def test_new_ladder_is_idle():
    ladder, clock, actions = make_ladder()

    ladder.advance()

    assert ladder.step is Step.RUNNING
    assert ladder.last_step is Step.RUNNING
    assert not ladder.requested
    assert ladder.cause is None
    assert ladder.next_deadline() is None
    assert actions.calls == []


def test_user_cancel_walks_every_step():
    ladder, clock, actions = make_ladder()

    assert ladder.request(CancelCause.USER, "stop please") is True
    assert ladder.step is Step.COOPERATIVE
    assert ladder.requested
    assert ladder.requested_at == START_TIME
    assert actions.calls == [(DELIVER, START_TIME)]
    assert actions.reasons == ["stop please"]
    assert ladder.next_deadline() == START_TIME + CANCEL_GRACE_S

    clock.advance(CANCEL_GRACE_S - 0.001)
    ladder.advance()
    assert ladder.step is Step.COOPERATIVE
    assert actions.names == [DELIVER]

    clock.now = START_TIME + CANCEL_GRACE_S
    ladder.advance()
    assert ladder.step is Step.SIGTERM
    assert actions.names == [DELIVER, TERMINATE]
    assert ladder.next_deadline() == START_TIME + CANCEL_GRACE_S + TERM_GRACE_S

    clock.advance(TERM_GRACE_S - 0.001)
    ladder.advance()
    assert ladder.step is Step.SIGTERM
    assert actions.names == [DELIVER, TERMINATE]

    clock.now = START_TIME + CANCEL_GRACE_S + TERM_GRACE_S
    ladder.advance()
    assert ladder.step is Step.SIGKILL
    assert ladder.last_step is Step.SIGKILL
    assert actions.names == [DELIVER, TERMINATE, KILL]
    assert ladder.next_deadline() is None


def test_history_records_steps_and_times():
    ladder, clock, actions = make_ladder()

    ladder.request(CancelCause.TIMEOUT, "2 s")
    clock.advance(10.0)
    ladder.advance()
    clock.advance(5.0)
    ladder.advance()

    assert [taken.step for taken in ladder.history] == [Step.COOPERATIVE, Step.SIGTERM, Step.SIGKILL]
    assert [taken.at for taken in ladder.history] == [START_TIME, START_TIME + 10.0, START_TIME + 15.0]
    assert [taken.elapsed_s for taken in ladder.history] == [0.0, 10.0, 15.0]


@pytest.mark.parametrize("cause", list(CancelCause))
def test_first_step_of_each_cause(cause):
    ladder, clock, actions = make_ladder()

    ladder.request(cause, "why")

    assert ladder.step is FIRST_STEP[cause]
    assert ladder.cause is cause
    if FIRST_STEP[cause] is Step.COOPERATIVE:
        assert actions.names == [DELIVER]
        assert actions.reasons == ["why"]
        assert ladder.next_deadline() == START_TIME + CANCEL_GRACE_S
    else:
        assert FIRST_STEP[cause] is Step.SIGKILL
        assert actions.names == [KILL]
        assert ladder.next_deadline() is None


def test_memory_skips_cooperative_and_sigterm():
    """A tree over its memory budget is killed at once: no cancel frame, no SIGTERM."""
    ladder, clock, actions = make_ladder()

    ladder.request(CancelCause.MEMORY, "rss 300 MiB > 256 MiB")
    clock.advance(1000.0)
    ladder.advance()

    assert actions.names == [KILL]
    assert [taken.step for taken in ladder.history] == [Step.SIGKILL]


def test_first_step_table_covers_every_cause():
    assert set(FIRST_STEP) == set(CancelCause)
    assert set(CAUSE_STRENGTH) == set(CancelCause)
    assert all(step in (Step.COOPERATIVE, Step.SIGKILL) for step in FIRST_STEP.values())


# -- grace periods of zero ---------------------------------------------------------------------------


def test_zero_cancel_grace_terminates_next_advance():
    ladder, clock, actions = make_ladder(cancel_grace_s=0, term_grace_s=TERM_GRACE_S)

    ladder.request(CancelCause.USER, "now")
    assert actions.names == [DELIVER]
    assert ladder.next_deadline() == START_TIME

    ladder.advance()
    assert actions.names == [DELIVER, TERMINATE]
    assert ladder.step is Step.SIGTERM
    assert ladder.next_deadline() == START_TIME + TERM_GRACE_S


def test_zero_term_grace_kills_at_once():
    ladder, clock, actions = make_ladder(cancel_grace_s=CANCEL_GRACE_S, term_grace_s=0)

    ladder.request(CancelCause.USER, "now")
    clock.advance(CANCEL_GRACE_S)
    ladder.advance()

    assert actions.calls == [(DELIVER, START_TIME), (TERMINATE, START_TIME + 10.0), (KILL, START_TIME + 10.0)]
    assert ladder.next_deadline() is None


def test_zero_graces_kill_in_one_advance():
    ladder, clock, actions = make_ladder(cancel_grace_s=0, term_grace_s=0)

    ladder.request(CancelCause.SHUTDOWN, "stopping")
    ladder.advance()

    assert actions.names == [DELIVER, TERMINATE, KILL]
    assert ladder.step is Step.SIGKILL
    assert [taken.elapsed_s for taken in ladder.history] == [0.0, 0.0, 0.0]


def test_negative_grace_rejected():
    with pytest.raises(ValueError, match="cancel_grace_s must be >= 0, got -1"):
        EscalationPolicy(cancel_grace_s=-1, term_grace_s=5)
    with pytest.raises(ValueError, match="term_grace_s must be >= 0, got -0.5"):
        EscalationPolicy(cancel_grace_s=1, term_grace_s=-0.5)


# -- each grace counts from the moment its step was taken --------------------------------------------


def test_late_advance_restarts_grace_from_step():
    """A driver that wakes late gives the next step its whole grace period."""
    ladder, clock, actions = make_ladder()

    ladder.request(CancelCause.USER, "late driver")
    clock.now = START_TIME + CANCEL_GRACE_S + 3.0
    ladder.advance()

    assert ladder.step is Step.SIGTERM
    assert ladder.history[-1].at == START_TIME + CANCEL_GRACE_S + 3.0
    assert ladder.next_deadline() == START_TIME + CANCEL_GRACE_S + 3.0 + TERM_GRACE_S


def test_very_late_advance_keeps_term_grace():
    """Even an hour late, SIGKILL still waits term_grace_s after SIGTERM."""
    ladder, clock, actions = make_ladder()

    ladder.request(CancelCause.USER, "very late driver")
    clock.now = START_TIME + 3600.0
    ladder.advance()

    assert actions.names == [DELIVER, TERMINATE]
    assert [taken.at for taken in ladder.history] == [START_TIME, START_TIME + 3600.0]

    clock.now += TERM_GRACE_S
    ladder.advance()

    assert actions.names == [DELIVER, TERMINATE, KILL]


def test_second_request_does_not_restart_grace():
    ladder, clock, actions = make_ladder()

    ladder.request(CancelCause.SHUTDOWN, "stopping")
    clock.advance(7.0)
    ladder.request(CancelCause.USER, "user too")

    assert ladder.requested_at == START_TIME
    assert ladder.next_deadline() == START_TIME + CANCEL_GRACE_S
    clock.now = START_TIME + CANCEL_GRACE_S
    ladder.advance()
    assert actions.names == [DELIVER, TERMINATE]


# -- cause strengthening -----------------------------------------------------------------------------


COOPERATIVE_CAUSES = [cause for cause in CancelCause if FIRST_STEP[cause] is Step.COOPERATIVE]


@pytest.mark.parametrize(
    "first, second",
    [pair for pair in itertools.permutations(COOPERATIVE_CAUSES, 2)],
    ids=lambda cause: cause.name,
)
def test_stronger_cause_wins(first, second):
    ladder, clock, actions = make_ladder()

    ladder.request(first, f"first: {first.value}")
    clock.advance(1.0)
    changed = ladder.request(second, f"second: {second.value}")

    stronger = second if CAUSE_STRENGTH[second] > CAUSE_STRENGTH[first] else first
    assert ladder.cause is stronger
    assert ladder.reason == f"{'second' if stronger is second else 'first'}: {stronger.value}"
    assert changed is (stronger is second)
    # Only the first request delivers the cancel. The second changes the cause the outcome reports.
    assert actions.names == [DELIVER]
    assert actions.reasons == [f"first: {first.value}"]


def test_cause_strength_order():
    """A lost lock beats everything, a user's cancel beats the others, shutdown is weakest."""
    ordered = sorted(CancelCause, key=CAUSE_STRENGTH.__getitem__)

    assert ordered[0] is CancelCause.SHUTDOWN
    assert ordered[-1] is CancelCause.LOCK_LOST
    assert ordered[-2] is CancelCause.USER
    assert len(set(CAUSE_STRENGTH.values())) == len(CAUSE_STRENGTH)


def test_same_cause_twice_changes_nothing():
    ladder, clock, actions = make_ladder()

    ladder.request(CancelCause.USER, "first reason")
    clock.advance(2.0)

    assert ladder.request(CancelCause.USER, "second reason") is False
    assert ladder.reason == "first reason"
    assert actions.names == [DELIVER]


def test_memory_after_user_cancel_jumps_to_sigkill():
    """A memory breach during the cooperative grace kills at once; the user's cause is kept."""
    ladder, clock, actions = make_ladder()

    ladder.request(CancelCause.USER, "user")
    clock.advance(1.0)
    changed = ladder.request(CancelCause.MEMORY, "rss 600 MiB > 512 MiB")

    assert changed is True
    assert ladder.step is Step.SIGKILL
    assert ladder.cause is CancelCause.USER
    assert actions.names == [DELIVER, KILL]
    assert ladder.history[-1].elapsed_s == 1.0


def test_memory_after_timeout_takes_the_cause():
    ladder, clock, actions = make_ladder()

    ladder.request(CancelCause.TIMEOUT, "2 s")
    ladder.request(CancelCause.MEMORY, "rss 600 MiB > 512 MiB")

    assert ladder.cause is CancelCause.MEMORY
    assert ladder.reason == "rss 600 MiB > 512 MiB"
    assert actions.names == [DELIVER, KILL]


def test_lock_lost_after_sigterm_keeps_step():
    ladder, clock, actions = make_ladder()

    ladder.request(CancelCause.USER, "user")
    clock.advance(CANCEL_GRACE_S)
    ladder.advance()
    changed = ladder.request(CancelCause.LOCK_LOST, "lock renewal failed")

    assert changed is True
    assert ladder.cause is CancelCause.LOCK_LOST
    assert ladder.step is Step.SIGTERM
    assert actions.names == [DELIVER, TERMINATE]
    assert ladder.next_deadline() == START_TIME + CANCEL_GRACE_S + TERM_GRACE_S


# -- escalate_now ------------------------------------------------------------------------------------


def test_escalate_now_without_request_kills_only():
    ladder, clock, actions = make_ladder()

    ladder.escalate_now()

    assert actions.calls == [(KILL, START_TIME)]
    assert ladder.step is Step.SIGKILL
    assert ladder.requested_at == START_TIME
    assert ladder.next_deadline() is None


@pytest.mark.parametrize("advance_s, before", [(0.0, [DELIVER]), (CANCEL_GRACE_S, [DELIVER, TERMINATE])])
def test_escalate_now_mid_ladder(advance_s, before):
    ladder, clock, actions = make_ladder()
    ladder.request(CancelCause.SHUTDOWN, "stopping")
    clock.advance(advance_s)
    ladder.advance()
    assert actions.names == before

    clock.advance(0.5)
    ladder.escalate_now()

    assert actions.names == before + [KILL]
    assert actions.calls[-1] == (KILL, START_TIME + advance_s + 0.5)
    assert ladder.history[-1].elapsed_s == advance_s + 0.5
    assert ladder.cause is CancelCause.SHUTDOWN
    assert ladder.next_deadline() is None


def test_escalate_now_twice_kills_once():
    ladder, clock, actions = make_ladder()
    ladder.request(CancelCause.USER, "user")

    ladder.escalate_now()
    clock.advance(1.0)
    ladder.escalate_now()
    ladder.advance()

    assert actions.names == [DELIVER, KILL]


# -- mark_exited -------------------------------------------------------------------------------------


def test_mark_exited_stops_pending_steps():
    ladder, clock, actions = make_ladder()
    ladder.request(CancelCause.USER, "user")

    ladder.mark_exited()
    clock.advance(3600.0)
    ladder.advance()
    ladder.escalate_now()

    assert ladder.exited
    assert ladder.next_deadline() is None
    assert actions.names == [DELIVER]
    assert ladder.step is Step.COOPERATIVE


def test_mark_exited_after_sigterm_sends_no_sigkill():
    ladder, clock, actions = make_ladder()
    ladder.request(CancelCause.TIMEOUT, "2 s")
    clock.advance(CANCEL_GRACE_S)
    ladder.advance()

    ladder.mark_exited()
    clock.advance(TERM_GRACE_S)
    ladder.advance()

    assert actions.names == [DELIVER, TERMINATE]
    assert ladder.last_step is Step.SIGTERM


@pytest.mark.parametrize("cause", list(CancelCause))
def test_request_after_exit_takes_no_step(cause):
    ladder, clock, actions = make_ladder()

    ladder.mark_exited()
    ladder.request(cause, "too late")
    clock.advance(3600.0)
    ladder.advance()

    assert actions.calls == []
    assert ladder.step is Step.RUNNING
    assert ladder.cause is cause
    assert ladder.next_deadline() is None


# -- no action twice, whatever the order of events ---------------------------------------------------


@pytest.mark.parametrize("seed", range(40))
def test_random_events_never_repeat_action(seed):
    """Requests, advances, escalations and exits in random order: each action at most once, in order."""
    rng = random.Random(seed)
    ladder, clock, actions = make_ladder(cancel_grace_s=rng.choice([0, 1, 10]), term_grace_s=rng.choice([0, 1, 5]))
    exited_at_call = None

    for _ in range(30):
        event = rng.choice(["request", "request", "advance", "advance", "advance", "tick", "escalate", "exit"])
        if event == "request":
            ladder.request(rng.choice(list(CancelCause)), f"reason {rng.random():.3f}")
        elif event == "advance":
            ladder.advance()
        elif event == "tick":
            clock.advance(rng.choice([0.0, 0.5, 1.0, 5.0, 20.0]))
        elif event == "escalate" and rng.random() < 0.3:
            ladder.escalate_now()
        elif event == "exit" and rng.random() < 0.2:
            ladder.mark_exited()
            if exited_at_call is None:
                exited_at_call = len(actions.calls)

        names = actions.names
        assert len(names) == len(set(names)), f"an action repeated: {names}"
        order = [DELIVER, TERMINATE, KILL]
        assert names == sorted(names, key=order.index), f"actions out of order: {names}"
        if exited_at_call is not None:
            assert len(actions.calls) == exited_at_call, "an action ran after mark_exited()"
        steps = [taken.step for taken in ladder.history]
        assert steps == sorted(steps)
        assert ladder.step == (steps[-1] if steps else Step.RUNNING)
