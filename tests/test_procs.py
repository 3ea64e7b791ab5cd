"""tests/procs.py: a failing command or wait says what happened (the e2e test once failed with its output hidden)."""

from __future__ import annotations

import sys

import pytest

from tests.procs import run_cmd, run_ok, tail, wait_until

PY = sys.executable


def test_run_ok_shows_both_streams_of_a_failing_command():
    script = "import sys; print('to stdout'); print('the real reason', file=sys.stderr); sys.exit(3)"
    with pytest.raises(AssertionError) as failed:
        run_ok([PY, "-c", script], timeout=120)
    message = str(failed.value)
    assert "exited 3" in message and "to stdout" in message and "the real reason" in message


def test_run_ok_returns_the_output_of_a_passing_command():
    assert run_ok([PY, "-c", "print('fine')"], timeout=120).stdout.strip() == "fine"


def test_a_timeout_fails_with_what_was_printed_so_far():
    script = "import sys, time; print('started', flush=True); time.sleep(60)"
    with pytest.raises(pytest.fail.Exception) as failed:
        run_cmd([PY, "-c", script], timeout=5)
    assert "timed out" in str(failed.value) and "started" in str(failed.value)


def test_wait_until_polls_a_condition_and_names_it_with_details_when_it_never_holds():
    calls = []
    assert wait_until(lambda: calls.append(1) or len(calls) >= 3, "three polls", 60, poll_s=0.01) < 60
    assert len(calls) == 3
    with pytest.raises(AssertionError, match=r"(?s)the server did not happen within 0 s.*log line 9"):
        wait_until(
            lambda: False, "the server", 0, poll_s=0.01, details=lambda: "\n".join(f"log line {i}" for i in range(10))
        )


def test_tail_keeps_the_end():
    assert tail("x" * 10 + "END", limit=3) == "…END" and tail(b"ok") == "ok" and tail(None) == ""
