"""Driving an `UpperLayer` over an anyio byte stream during association set-up."""

from __future__ import annotations

import math
from collections.abc import Callable

import anyio
import anyio.abc

from dicomnet.fsm import State
from dicomnet.ul import NEED_DATA, ConnectionClosed, ULEvent, UpperLayer

__all__ = ["next_ul_event"]


async def next_ul_event(
    stream: anyio.abc.ByteStream, ul: UpperLayer, clock: Callable[[], float]
) -> ULEvent:
    """Receive until the Upper Layer has an event; write what it produces; run its timers.

    Returns `ConnectionClosed` once the machine is back in Sta1.
    """
    while True:
        event = ul.next_event()
        out = ul.data_to_send()
        if out:
            try:
                await stream.send(out)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                ul.connection_lost()
        if event is not NEED_DATA:
            return event  # type: ignore[return-value]
        if ul.state == State.STA1:
            return ConnectionClosed()
        deadline = ul.get_timer()
        timeout = math.inf if deadline is None else max(0.0, deadline - clock())
        data = b""
        with anyio.move_on_after(timeout) as scope:
            try:
                data = await stream.receive(65536)
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                data = b""
            except OSError:
                data = b""
        if scope.cancelled_caught:
            ul.handle_timer()
        else:
            ul.receive_data(data)
