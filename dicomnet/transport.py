"""Driving an `UpperLayer` over a `ByteStream` during association set-up."""

from __future__ import annotations

from collections.abc import Callable

import anyio

from dicomnet.proto.fsm import State
from dicomnet.proto.ul import NEED_DATA, ConnectionClosed, ULEvent, UpperLayer
from dicomnet.stream import ByteStream

__all__ = ["next_ul_event"]


async def next_ul_event(stream: ByteStream, ul: UpperLayer, clock: Callable[[], float]) -> ULEvent:
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
        timeout = None if deadline is None else max(0.0, deadline - clock())
        data = await stream.receive(65536, timeout)
        if data is None:
            ul.handle_timer(clock())
        else:
            ul.receive_data(data, clock())
