"""The sans-IO core: PDUs, the Upper Layer state machine, DIMSE messages, negotiation.

Nothing here does I/O, imports asyncio or reads a clock: bytes go in with
`receive_data(data, now)`, events and bytes come out, time is an argument.
"""
