"""The per-operation state machine of the sans-IO core (`dicomnet.proto.operations`):
Message IDs, the asynchronous operations window, DIMSE deadlines on a given `now`,
cancel, and requests performed for the peer — without sockets or an event loop."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dicomnet.errors import InvalidStateError
from dicomnet.proto.operations import InvokedState, Operations, Verdict


def unlimited(timeout: float | None = None) -> Operations:
    return Operations(max_invoked=0, max_performed=0, dimse_timeout=timeout)


# --- message IDs -----------------------------------------------------------------------------


def test_message_ids_count_up_and_wrap_to_one() -> None:
    ops = unlimited()
    assert [ops.invoke() for _ in range(3)] == [1, 2, 3]
    ops.cancel(2)  # never sent: over at once
    assert ops.invoke() == 4  # counts on, does not reuse at once
    for n in (1, 3, 4):
        ops.cancel(n)
    for expected in range(5, 0xFFFF):
        assert ops.invoke() == expected
        ops.cancel(expected)
    assert [ops.invoke(), ops.invoke(), ops.invoke()] == [0xFFFF, 1, 2]


def test_message_ids_skip_outstanding_ones_and_run_out() -> None:
    ops = unlimited()
    allocated = [ops.invoke() for _ in range(0xFFFF)]
    assert allocated == list(range(1, 0x10000))
    assert not ops.can_invoke
    with pytest.raises(InvalidStateError):
        ops.invoke()
    ops.cancel(3)
    ops.cancel(4242)
    assert ops.invoke() == 3  # wrapped: 1 and 2 are still outstanding
    assert ops.invoke() == 4242


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.just(None), st.integers(0, 50)), max_size=200))
def test_message_ids_unique_among_outstanding(steps: list[int | None]) -> None:
    ops = unlimited()
    held: list[int] = []
    for step in steps:
        if step is None or not held:
            new = ops.invoke()
            assert 1 <= new <= 0xFFFF and new not in held
            ops.sent(new, 0.0)
            held.append(new)
        else:
            done = held.pop(step % len(held))
            assert ops.response(done, final=True, now=0.0) is Verdict.FINAL
        assert set(ops.invoked) == set(held)


# --- the window ------------------------------------------------------------------------------


def test_the_invoked_window_is_kept_until_final_responses() -> None:
    ops = Operations(max_invoked=2, max_performed=1)
    first, second = ops.invoke(), ops.invoke()
    assert not ops.can_invoke
    with pytest.raises(InvalidStateError):
        ops.invoke()
    ops.sent(first, 0.0)
    ops.sent(second, 0.0)
    assert ops.response(first, final=False, now=1.0) is Verdict.DELIVER
    assert not ops.can_invoke  # a pending response does not free the slot
    assert ops.response(first, final=True, now=2.0) is Verdict.FINAL
    assert ops.can_invoke
    assert ops.invoke() == 3


def test_the_performed_window_and_duplicate_message_ids() -> None:
    ops = Operations(max_invoked=1, max_performed=2)
    assert ops.perform(7) and ops.can_perform
    assert not ops.perform(7)  # a duplicate invocation (0x0210)
    assert ops.perform(8) and not ops.can_perform
    assert ops.cancel_requested(8) and not ops.cancel_requested(9)
    ops.performed(7)
    assert ops.can_perform and not ops.cancel_requested(7)


# --- responses and cancel --------------------------------------------------------------------


def test_responses_are_delivered_then_dropped_after_cancel() -> None:
    ops = unlimited()
    mid = ops.invoke()
    ops.sent(mid, 0.0)
    assert ops.invoked[mid].state is InvokedState.SENT
    assert ops.response(mid, final=False, now=0.0) is Verdict.DELIVER
    assert ops.invoked[mid].state is InvokedState.PENDING
    assert ops.cancel(mid)  # send C-CANCEL
    assert not ops.cancel(mid)  # once
    assert ops.response(mid, final=False, now=0.0) is Verdict.DROP
    assert ops.is_outstanding(mid)  # the slot is held until the final response
    assert ops.response(mid, final=True, now=0.0) is Verdict.DROP_FINAL
    assert not ops.is_outstanding(mid)
    assert ops.response(mid, final=True, now=0.0) is Verdict.UNKNOWN


def test_a_response_may_come_before_the_shell_says_sent() -> None:
    ops = unlimited(timeout=5.0)
    mid = ops.invoke()
    assert ops.response(mid, final=False, now=1.0) is Verdict.DELIVER
    ops.sent(mid, 2.0)  # late: the deadline still runs from here
    assert ops.get_timer() == 7.0
    assert ops.response(mid, final=True, now=3.0) is Verdict.FINAL


def test_a_request_never_sent_ends_when_cancelled() -> None:
    ops = Operations(max_invoked=1)
    mid = ops.invoke()
    assert not ops.cancel(mid)  # nothing to tell the peer
    assert ops.can_invoke and not ops.is_outstanding(mid)


def test_abandon_drops_without_cancel() -> None:
    ops = unlimited()
    mid = ops.invoke()
    ops.sent(mid, 0.0)
    ops.abandon(mid)
    assert ops.invoked[mid].state is InvokedState.CANCELLED
    assert ops.response(mid, final=True, now=0.0) is Verdict.DROP_FINAL


def test_close_ends_everything() -> None:
    ops = unlimited()
    first, second = ops.invoke(), ops.invoke()
    ops.sent(first, 0.0)
    ops.perform(5)
    assert sorted(ops.close()) == [first, second]
    assert not ops.invoked and not ops.performing


# --- DIMSE deadlines -------------------------------------------------------------------------


def test_deadlines_run_from_sending_and_restart_with_each_pending_response() -> None:
    ops = unlimited(timeout=5.0)
    first, second = ops.invoke(), ops.invoke()
    assert ops.get_timer() is None and ops.expired(100.0) == []  # nothing sent yet
    ops.sent(first, 100.0)
    ops.sent(second, 102.0)
    assert ops.get_timer() == 105.0
    assert ops.response(first, final=False, now=104.0) is Verdict.DELIVER
    assert ops.get_timer() == 107.0  # the second: 102 + 5
    assert ops.expired(107.0) == [second]
    assert not ops.is_outstanding(second)
    assert ops.get_timer() == 109.0
    assert ops.expired(108.999) == []
    assert ops.expired(109.0) == [first]
    assert ops.get_timer() is None and ops.expired(1e9) == []


def test_no_deadlines_without_a_timeout() -> None:
    ops = unlimited(timeout=None)
    mid = ops.invoke()
    ops.sent(mid, 0.0)
    ops.response(mid, final=False, now=1.0)
    assert ops.get_timer() is None and ops.expired(1e9) == []


def test_a_response_to_an_unknown_request_is_harmless() -> None:
    ops = unlimited(timeout=1.0)
    assert ops.response(99, final=False, now=0.0) is Verdict.UNKNOWN
    assert ops.response(99, final=True, now=0.0) is Verdict.UNKNOWN
    assert ops.get_timer() is None
