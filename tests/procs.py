"""Helpers for tests that run commands and wait for servers: a failure always shows what the command said.

    done = run_ok(["ray", "job", "submit", ...], env=env, timeout=600)   # rc != 0 → the assert shows stdout/stderr
    wait_until(lambda: answers(url), "the dashboard agent", 600, details=lambda: log.read_text())

Loaded machines (2 shared cores) make everything slow but seldom wrong, so limits are generous and every wait is a
condition polled until it holds, never a fixed sleep.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Sequence

TAIL = 4000  # characters of each stream an assert message shows (a traceback and the lines before it)


def tail(text: str | bytes | None, limit: int = TAIL) -> str:
    """The last ``limit`` characters of a command's output (bytes decoded; None → empty)."""
    if text is None:
        return ""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return text if len(text) <= limit else "…" + text[-limit:]


def describe(cmd: Sequence[str], returncode: int | None, stdout: str | bytes | None, stderr: str | bytes | None) -> str:
    """One message naming the command, its exit status and the tails of both streams."""
    shown = " ".join(str(c) for c in cmd)
    status = "timed out" if returncode is None else f"exited {returncode}"
    return f"`{shown}` {status}\n--- stdout (tail) ---\n{tail(stdout)}\n--- stderr (tail) ---\n{tail(stderr)}"


def run_cmd(cmd: Sequence[str], *, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run`` with output captured as text; a timeout fails the test with what was printed so far.

    Raises:
        pytest's Failed: the command ran past ``timeout`` seconds (its output so far is in the message).
    """
    import pytest

    try:
        return subprocess.run(list(map(str, cmd)), capture_output=True, text=True, timeout=timeout, **kwargs)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"after {timeout:.0f} s: " + describe(cmd, None, exc.stdout, exc.stderr))


def run_ok(cmd: Sequence[str], *, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    """``run_cmd`` that asserts exit status 0, showing the command's output when it is not."""
    done = run_cmd(cmd, timeout=timeout, **kwargs)
    assert done.returncode == 0, describe(cmd, done.returncode, done.stdout, done.stderr)
    return done


def wait_until(
    condition: Callable[[], bool],
    what: str,
    timeout_s: float,
    *,
    poll_s: float = 1.0,
    details: Callable[[], str] | None = None,
) -> float:
    """Poll ``condition`` until it holds; returns the seconds it took.

    Raises:
        AssertionError: it did not hold within ``timeout_s``; the message names ``what`` and adds ``details()``
            (e.g. a log tail) so the failure says why.
    """
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout_s:
            extra = ""
            if details is not None:
                try:
                    extra = "\n" + tail(details())
                except Exception as exc:  # noqa: BLE001 — the details are a courtesy; the timeout is the failure
                    extra = f"\n(details unavailable: {exc!r})"
            raise AssertionError(f"{what} did not happen within {timeout_s:.0f} s{extra}")
        time.sleep(poll_s)
    return time.monotonic() - start
