"""SIGTERM ends the training commands with exit code 143 even when Python drops the first ``SystemExit``."""

from __future__ import annotations

import os
import signal
import time
import weakref

import pytest

from sd_plugin.cli._signals import RESEND_S, sigterm_exits

#: How long the test waits for the re-sent SIGTERM (many times the re-send delay).
WAIT_S = 20 * RESEND_S


class _Target:
    pass


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_sigterm_whose_exit_was_swallowed_is_delivered_again():
    before = signal.getsignal(signal.SIGTERM)
    swallowed = []
    with pytest.raises(SystemExit) as stop, sigterm_exits() as leaving:
        try:
            target = _Target()
            # The handler runs inside this weak-reference callback, where Python prints and drops exceptions
            # (as it did inside the garbage collector during training): the first SystemExit is lost.
            ref = weakref.ref(target, lambda _: os.kill(os.getpid(), signal.SIGTERM))
            del target
            swallowed.append(ref() is None)
            deadline = time.monotonic() + WAIT_S
            while time.monotonic() < deadline:
                time.sleep(0.01)
        finally:
            leaving()
    assert swallowed == [True] and stop.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == before


def test_no_sigterm_is_sent_once_the_clean_up_has_begun():
    calls = []
    with sigterm_exits() as leaving:
        leaving()
        signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)  # a late SIGTERM during the clean-up: ignored
        calls.append("cleaned up")
    time.sleep(2 * RESEND_S)  # nothing was scheduled: no signal arrives (it would kill the test run)
    assert calls == ["cleaned up"]


def test_a_sigterm_turned_into_another_error_still_exits_143():
    """Code with a bare ``except:`` (mmengine's config printer) turns the SystemExit into another error."""
    with pytest.raises(SystemExit) as stop, sigterm_exits():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(WAIT_S)  # the handler raises SystemExit here
        except BaseException as err:  # noqa: BLE001 - what the library did
            raise SyntaxError("Failed to format the config file") from err
    assert stop.value.code == 128 + signal.SIGTERM


def test_other_errors_pass_through_untouched():
    with pytest.raises(ValueError, match="bad config"), sigterm_exits():
        raise ValueError("bad config")
