"""The indexer process of `dicomnet serve`: it indexes the files the serving process
stored, a batch at a time, and answers with how many it indexed.

This module imports the index and nothing of the networking side (no asyncio), so that
the process costs what pydicom and SQLite cost.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
from multiprocessing.connection import Connection

from dicomnet.pacs.index import Index

__all__ = ["INDEXER_NICENESS", "index_worker", "spawn_indexer"]

log = logging.getLogger("dicomnet")

# The indexer process runs at this lower priority (nice(2) increment).
INDEXER_NICENESS = 10

# Signals that stop `serve` (Ctrl-C, SIGTERM to the process group), not its indexer.
_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
_HAVE_SIGNAL_MASK = hasattr(signal, "pthread_sigmask")  # not on Windows


def index_worker(database: str, root: str, connection: Connection) -> None:
    """The indexer process: index each batch of paths it is sent, answer with the count.

    It ignores SIGINT/SIGTERM (a Ctrl-C or a signal to the process group): the serving
    process stops it by closing the pipe, after the last batch. It starts with both
    blocked (see `spawn_indexer`), so one sent while it was starting up is
    dropped here.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if _HAVE_SIGNAL_MASK:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    try:
        # Background work: on a busy machine, answering associations comes first.
        os.nice(INDEXER_NICENESS)
    except (AttributeError, OSError):  # pragma: no cover - Windows, or not permitted
        pass
    with Index(database, root=root) as index:
        while True:
            try:
                batch = connection.recv()
            except (EOFError, OSError):  # the serving process is gone
                return
            if batch is None:
                return
            try:
                count = index.add_many(batch)
            except Exception as exc:  # answer anyway: the files stay, the batch is retried
                log.error("could not index %d stored file(s): %s", len(batch), exc)
                count = -1
            try:
                connection.send(count)
            except OSError:  # the serving process is gone; the batch is indexed
                return


def spawn_indexer(database: str, root: str) -> tuple[subprocess.Popen[bytes], Connection]:
    """Start the indexer process (`index_worker`) and connect to it.

    A plain subprocess on a socket pair, not `multiprocessing`: its spawning starts a
    resource tracker, one more interpreter (~13 MiB) for nothing here. The child starts
    with the stop signals blocked, so that one reaching the process group while the new
    interpreter starts up stays pending instead of killing it (it ignores them, then
    unblocks them)."""
    ours, theirs = socket.socketpair()
    # Where this `dicomnet` was imported from, looked at last: a checkout run in place.
    package_parent = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
    # The database in the environment, not on the command line, which every user of the
    # host can read: a PostgreSQL URL may hold a password.
    argv = [sys.executable, "-c", _INDEXER_MAIN, str(theirs.fileno()), root]
    previous = (
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS) if _HAVE_SIGNAL_MASK else None
    )
    try:
        process = subprocess.Popen(
            [*argv, package_parent],
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
            env=_INDEXER_ENVIRONMENT | dict(os.environ) | {_DATABASE_VARIABLE: database},
        )
    except BaseException:
        ours.close()
        raise
    finally:
        if previous is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        theirs.close()
    return process, Connection(ours.detach())


# The indexer does no linear algebra: numpy (imported by pydicom when it is installed)
# need not start OpenBLAS's worker threads, which spin for a while after start-up (about
# 0.1 s of CPU per start here). Set in the environment, the user's setting wins.
_INDEXER_ENVIRONMENT = {"OPENBLAS_NUM_THREADS": "1"}

_DATABASE_VARIABLE = "DICOMNET_INDEXER_DATABASE"
_INDEXER_MAIN = (
    "import os, sys; sys.path.append(sys.argv[3]); "
    "from multiprocessing.connection import Connection; "
    "from dicomnet.pacs.indexer_process import index_worker; "
    f"index_worker(os.environ.pop({_DATABASE_VARIABLE!r}), sys.argv[2],"
    " Connection(int(sys.argv[1])))"
)
