"""Hostile input against issue 22's serving parts (feedback, response cache, canary, batches, records, production):
each test is a defect found by throwing malformed input at them, kept so it stays fixed. In process, no Ray."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from tests.serving.test_batches import jsonl, line, make_files, upload


# ---- CLIs against a tracking server that is not there ----------------------------------------------------------
def closed_port() -> int:
    """A local port nothing listens on (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def silent_server():
    """``http://127.0.0.1:<port>``: a server that accepts connections and never answers (a hung MLflow)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held, stop = [], threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    listener.close()


def run_cli(main, argv: list[str]) -> tuple[int, float]:
    start = time.monotonic()
    rc = main(argv)
    return rc, time.monotonic() - start


@pytest.mark.parametrize("which", ["generations", "canary"])
def test_a_cli_fails_within_seconds_naming_an_unreachable_or_hung_tracking_server(which, silent_server, capsys,
                                                                                 monkeypatch):  # fmt: skip
    from cluster.generations import main as generations
    from serving.canary_cli import main as canary

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")  # the hung server: each attempt waits this long
    monkeypatch.setenv("LORAFLEET_URL", f"http://127.0.0.1:{closed_port()}")
    for uri in (f"http://127.0.0.1:{closed_port()}", silent_server):
        argv = ["--model", "toy", "--since", "1h"] if which == "generations" else ["status", "toy"]
        rc, took = run_cli(generations if which == "generations" else canary, [*argv, "--tracking-uri", uri])
        err = capsys.readouterr().err
        assert rc == 1 and took < 15, (rc, took, err)  # MLflow's own retries would hold it for minutes
        assert f"MLflow tracking server at {uri} did not answer" in err and "--tracking-uri" in err, err


@pytest.mark.parametrize("which", ["generations", "canary"])
def test_a_cli_given_a_tracking_uri_mlflow_has_no_store_for_says_so_without_a_traceback(which, capsys, monkeypatch):
    from cluster.generations import main as generations
    from serving.canary_cli import main as canary

    monkeypatch.setenv("LORAFLEET_URL", f"http://127.0.0.1:{closed_port()}")
    argv = ["--model", "toy"] if which == "generations" else ["status", "toy"]
    rc = (generations if which == "generations" else canary)([*argv, "--tracking-uri", "foo://bar"])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("error: ") and "foo://bar" in err and "Traceback" not in err, err


@pytest.mark.parametrize("since", ["1" * 400 + "d", "99999999999w", "0001-01-01T00:00+14:00", "1969-12-31"])
def test_generations_since_before_1970_or_past_a_float_is_a_bad_argument(since, capsys):
    from cluster.generations import main, since_ms

    with pytest.raises(ValueError, match="before 1970"):
        since_ms(since)
    assert main(["--model", "toy", "--since", since, "--tracking-uri", "http://127.0.0.1:1"]) == 2
    assert "--since" in capsys.readouterr().err
    assert since_ms("2h", now=10_000.0) == 2_800_000 and since_ms("1970-01-01T00:00:01Z") == 1000


# ---- batch input files -----------------------------------------------------------------------------------------
def test_a_batch_file_with_a_byte_order_mark_is_read_by_the_runner_as_it_was_checked(tmp_path):
    """The upload check reads lines as the live route reads a body (a UTF-8 BOM skipped); the runner must read
    them the same way, not fail the accepted batch with 'invalid_input'."""
    from serving.batches.inputs import read_lines

    files = make_files(tmp_path / "files")
    for data in (b"\xef\xbb\xbf" + jsonl([line("a", seed=1), line("b")]),
                 jsonl([line("a", seed=1), line("b")]).replace(b"\n", b"\r\n")):  # fmt: skip
        f = upload(files, data)
        got = list(read_lines(files.root / f.id / "content.jsonl"))
        assert [(x.custom_id, x.body.seed) for x in got] == [("a", 1), ("b", None)]
    utf16 = upload(files, "\ufeff".encode("utf-16-le") + line("a", seed=1).encode("utf-16-le"))  # one line: accepted
    assert [x.custom_id for x in read_lines(files.root / utf16.id / "content.jsonl")] == ["a"]
    assert json.loads(line("a"))["custom_id"] == "a"


# ---- records: prompts are a client's text, printed on an admin's terminal ----------------------------------------
def test_generations_prints_a_prompts_control_characters_escaped_on_its_own_line():
    """A prompt is whatever a client sent: terminal escapes (clear screen, set the title), a newline that forges a
    line of the report, a bidi override must show as visible escapes, one prompt per line."""
    from cluster.generations import render

    hostile = "a\x1b[2J\x1b]0;pwned\x07 cat\n  version 9: 1000 requests, 1000 ok\r\u202eevil\x85"
    summary = {"3": {"requests": 2, "ok": 2, "rejected": 0, "errors": 0, "cancelled": 0, "error_rate": 0.0,
                     "cache_hit_rate": 0.0, "latency_p50_s": 1.0, "latency_p95_s": 1.0, "redacted": False,
                     "top_prompts": [[hostile, 2], ["ünïcode prompt 🎨", 1]]}}  # fmt: skip
    text = render("toy", summary, "1h")
    lines = text.splitlines()
    assert len(lines) == 4 and not any(c in text for c in "\x1b\x07\r\u202e\x85"), text
    assert (
        "\\x1b[2J" in lines[2]
        and "\\x0a" in lines[2]
        and "\\u202e" in lines[2]
        and lines[3].endswith("ünïcode prompt 🎨")
    )


# ---- batches: server faults reach the tenant without the server's paths ----------------------------------------
def test_a_batch_that_meets_server_faults_tells_its_tenant_what_failed_without_server_paths(tmp_path):
    """A request the generator's handle fails on (a RayTaskError's text holds the replica's traceback and file
    paths) and an input the runner cannot read (an OSError names the file) end as errors naming the kind of fault,
    as the live route's 500 does — the details are in the server's log, not in the tenant's files."""
    import asyncio

    from tests.serving.test_batches import FakeGenerator, make_batch, read_file, runner_for

    secret = str(tmp_path / "srv" / "replica.py")

    class Broken(FakeGenerator):
        async def generate(self, req) -> dict:
            if "raise" in req.prompt:
                raise RuntimeError(f'Traceback (most recent call last):\n  File "{secret}", line 1')
            return await super().generate(req)

    files, store, record = make_batch(tmp_path, [line("ok", seed=1), line("boom", prompt="raise it", seed=2)])

    async def run(runner):
        await runner.step()
        await runner.wait_idle()

    asyncio.run(run(runner_for(files, store, Broken())))
    done = store.get(record.id, "acme")
    assert done.status == "completed" and (done.request_counts.completed, done.request_counts.failed) == (1, 1)
    [failed] = read_file(files, done.error_file_id)
    text = json.dumps(failed)
    assert failed["custom_id"] == "boom" and failed["response"]["status_code"] == 500, failed
    assert "RuntimeError" in text and secret not in text and str(tmp_path) not in text, text

    files2, store2, unreadable = make_batch(tmp_path / "u", [line("a")])
    (store2.folder(unreadable.id) / "input.jsonl").unlink()  # the disk lost it
    asyncio.run(run(runner_for(files2, store2, Broken())))
    view = store2.view(store2.get(unreadable.id, "acme"))
    assert view["status"] == "failed" and view["errors"]["data"][0]["code"] == "invalid_input", view
    assert "FileNotFoundError" in json.dumps(view) and str(tmp_path) not in json.dumps(view), view


def test_a_batch_line_with_a_seed_no_generator_takes_is_refused_at_upload():
    """Every check Engine.prepare makes without a model is made on upload; a seed past 2^63 - max_n (image i uses
    seed + i, a torch.Generator seed) otherwise passed and failed each request of the accepted batch."""
    from serving.batches.inputs import check_line
    from serving.config import RequestLimits

    lim = RequestLimits()
    top = 2**63 - lim.max_n - 1
    assert not isinstance(check_line(line("ok", seed=top).encode(), 1, lim), list)
    for seed in (top + 1, 10**30):
        [problem] = check_line(line("big", seed=seed).encode(), 3, lim)
        assert (problem.line, problem.param) == (3, "body.seed") and "limits.max_n" in problem.message, problem


# ---- lorafleet canary against a --url that is not the Serve app ------------------------------------------------
def test_canary_status_given_a_malformed_url_or_another_web_server_says_so_naming_url():
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from serving.canary_cli import fetch_report

    class Html(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(b"<html>a router's login page</html>")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Html)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        for url in ("http://[::1", f"http://127.0.0.1:{server.server_address[1]}"):
            with pytest.raises(RuntimeError, match="--url"):
                fetch_report(url, None, 2)
    finally:
        server.shutdown()
        server.server_close()
