"""SIGTERM as a clean exit for the training commands, delivered even when the first one lands in a bad spot.

Schedulers and torchrun stop a job with SIGTERM. The training commands turn it into ``SystemExit(128 + signum)``
(exit code 143) so their clean-up (data-loader workers, process group) runs. A signal handler runs wherever the main
thread happens to be, and an exception raised inside a garbage-collector or weak-reference callback is printed as
"Exception ignored" and dropped: the job would then train on. So each SIGTERM also re-sends itself after
:data:`RESEND_S` seconds until the clean-up has begun. Library code with a bare ``except:`` may also turn the
``SystemExit`` into another error (mmengine's config printer raises ``SyntaxError``): once a SIGTERM has arrived,
whatever leaves the block becomes ``SystemExit(128 + signum)``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Any, Callable, Dict, Iterator

__all__ = ["sigterm_exits", "RESEND_S"]

#: Seconds after which a SIGTERM whose exit was swallowed is delivered again.
RESEND_S = 1.0


@contextlib.contextmanager
def sigterm_exits() -> Iterator[Callable[[], None]]:
    """Inside the block SIGTERM raises ``SystemExit(128 + signum)``. Yields ``leaving``: call it first in the
    clean-up (a ``finally`` inside the block), so that no re-sent SIGTERM interrupts the clean-up; leaving the block
    restores the previous handler.

    Example:
        >>> with sigterm_exits() as leaving:
        ...     try:
        ...         train()
        ...     finally:
        ...         leaving()
        ...         clean_up()
    """
    state: Dict[str, Any] = {"leaving": False}

    def resend(signum: int) -> None:
        if not state["leaving"]:
            os.kill(os.getpid(), signum)

    def terminate(signum: int, frame: Any) -> None:
        if state["leaving"]:
            return  # clean-up under way: let it finish
        state["signum"] = signum
        timer = threading.Timer(RESEND_S, resend, args=(signum,))
        timer.daemon = True
        timer.start()
        raise SystemExit(128 + signum)

    def leaving() -> None:
        state["leaving"] = True

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield leaving
    except BaseException as err:
        signum = state.get("signum")
        if signum is not None and not (isinstance(err, SystemExit) and err.code == 128 + signum):
            raise SystemExit(128 + signum) from None  # the SIGTERM's exit, turned into another error on its way
        raise
    finally:
        state["leaving"] = True
        signal.signal(signal.SIGTERM, previous)
