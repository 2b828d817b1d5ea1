"""Tests for pipeline.fetch: local-file checks and http downloads against a real local server.

The HTTP server runs on 127.0.0.1 (port 0) in a background thread and counts
requests per path, so retries are observed from the server's side. Every path
the tests use carries a unique suffix, so counts never mix between tests.
Nothing here touches the internet.
"""

from __future__ import annotations

import gzip
import itertools
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest

from pipeline import fetch as fetch_mod
from pipeline.fetch import (
    EMPTY_FILE,
    HTTP_ERROR,
    MISSING_FILE,
    TIMEOUT,
    TOO_LARGE,
    UNREACHABLE,
    FetchConfig,
    FetchError,
    check_local,
    download,
    fetch,
)
from pipeline.synthetic import write_csv

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[1]
LOCAL_HOSTS = "127.0.0.1,localhost"

TRICKLE_BYTES = 40  # the slow endpoint sends this many bytes ...
TRICKLE_GAP = 0.05  # ... one every TRICKLE_GAP s: 2 s in all, far more than the 0.5 s timeout used below
HUGE = 10**12  # Content-Length declared by the oversize endpoint
STREAM_PIECE = 1 << 16
STREAM_PIECES = 64  # the unbounded endpoints send up to 4 MiB unless the client hangs up first
GZIP_BODIES = {"noise": random.Random(0).randbytes(50_000), "text": b"caption " * 10_000}


# --------------------------------------------------------------------------------------------------
# The server


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so connection reuse by the client's session is exercised
    timeout = 10  # idle keep-alive connections end on their own
    server: _Server

    def log_message(self, format, *args):  # noqa: A002 - keep the test output clean
        pass

    def do_GET(self):  # noqa: N802 - http.server's naming
        srv = self.server
        with srv.lock:
            srv.hits[self.path] += 1
            hit = srv.hits[self.path]
            srv.user_agents[self.path] = self.headers.get("User-Agent")
        parts = self.path.strip("/").split("/")
        kind = parts[0]
        try:
            getattr(self, f"_{kind}")(parts[1:], hit)
        except (BrokenPipeError, ConnectionResetError):
            with srv.lock:
                srv.disconnected.add(self.path)
            self.close_connection = True

    # -- helpers

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        if status not in (204, 304):
            self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if status not in (204, 304):
            self.wfile.write(body)

    def _write_chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")

    # -- endpoints: /<kind>/<args...>/<unique suffix>

    def _good(self, args, hit):
        self._send(200, self.server.video, {"Content-Type": "video/mp4"})

    def _chunked(self, args, hit):
        """The video, chunked (no Content-Length)."""
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        data = self.server.video
        for start in range(0, len(data), 1000):
            self._write_chunk(data[start : start + 1000])
        self.wfile.write(b"0\r\n\r\n")

    def _status(self, args, hit):
        code = int(args[0])
        self._send(code, b"" if code in (204, 304) else f"status {code}".encode())

    def _flaky(self, args, hit):
        """``/flaky/<code>/<n>/..``: status ``code`` for the first n requests, then the video."""
        code, failures = int(args[0]), int(args[1])
        if hit <= failures:
            self._send(code, b"try again later", {"Retry-After": "0"})
        else:
            self._send(200, self.server.video)

    def _redirect(self, args, hit):
        self._send(302, b"", {"Location": "/good/" + "/".join(args)})

    def _slow(self, args, hit):
        """Declares TRICKLE_BYTES and sends them one at a time, TRICKLE_GAP s apart (each gap < read timeout)."""
        self.send_response(200)
        self.send_header("Content-Length", str(TRICKLE_BYTES))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.flush()
        for _ in range(TRICKLE_BYTES):
            if self.server.stop.wait(TRICKLE_GAP):
                break
            self.wfile.write(b"x")
            self.wfile.flush()
        self.close_connection = True

    def _stall(self, args, hit):
        """Headers and a few bytes of a declared 1000, then silence for 3 s."""
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(b"y" * 10)
        self.wfile.flush()
        self.server.stop.wait(3)
        self.close_connection = True

    def _huge(self, args, hit):
        """Declares HUGE bytes, then sends 1 KiB every 20 ms until the client hangs up (or 3 s pass)."""
        self.send_response(200)
        self.send_header("Content-Length", str(HUGE))
        self.send_header("Connection", "close")
        self.end_headers()
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and not self.server.stop.is_set():
            self.wfile.write(b"z" * 1024)
            self.wfile.flush()
            with self.server.lock:
                self.server.sent[self.path] += 1024
            time.sleep(0.02)
        self.close_connection = True

    def _stream(self, args, hit):
        """``/stream/<chunked|close>/..``: up to STREAM_PIECES * 64 KiB with no Content-Length."""
        chunked = args[0] == "chunked"
        self.send_response(200)
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Connection", "close")  # without chunking, the body ends when the connection does
        self.end_headers()
        piece = b"s" * STREAM_PIECE
        for _ in range(STREAM_PIECES):
            if self.server.stop.is_set():
                break
            if chunked:
                self._write_chunk(piece)
            else:
                self.wfile.write(piece)
            self.wfile.flush()
            with self.server.lock:
                self.server.sent[self.path] += len(piece)
        else:
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
        self.close_connection = True

    def _empty(self, args, hit):
        """``/empty/<length|close>/..``: 200 with no body, declared as Content-Length 0 or by closing."""
        if args[0] == "length":
            self._send(200, b"")
        else:
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()

    def _short(self, args, hit):
        """Declares the video's length, sends half of it, closes the connection."""
        data = self.server.video
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data[: len(data) // 2])
        self.wfile.flush()
        self.close_connection = True

    def _exact(self, args, hit):
        """``/exact/<n>/<length|close>/..``: exactly n bytes, with or without Content-Length."""
        n = int(args[0])
        body = b"e" * n
        if args[1] == "length":
            self._send(200, body)
        else:
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)

    def _gzip(self, args, hit):
        """``/gzip/<noise|text>/..``: a body gzip-encoded on the wire (Content-Length is the encoded size).

        ``noise`` (like an mp4: incompressible) gets a little larger when encoded, ``text`` much smaller.
        """
        body = GZIP_BODIES[args[0]]
        self._send(200, gzip.compress(body), {"Content-Encoding": "gzip"})

    def _badgzip(self, args, hit):
        """Declares gzip but sends bytes that are not gzip."""
        self._send(200, b"this is not gzip data" * 10, {"Content-Encoding": "gzip"})


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a handler still sleeping never holds up the test run
    allow_reuse_address = True

    def __init__(self, video: bytes):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.video = video
        self.lock = threading.Lock()
        self.hits: Counter = Counter()
        self.sent: Counter = Counter()
        self.user_agents: dict[str, str | None] = {}
        self.disconnected: set[str] = set()
        self.stop = threading.Event()
        self._suffix = itertools.count()

    def handle_error(self, request, client_address):
        """A client hanging up (as the size and timeout tests make it do) is expected, not an error."""
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def path(self, *parts) -> str:
        """A fresh path ``/<parts>/<n>``, never requested before."""
        return "/" + "/".join(str(p) for p in (*parts, f"u{next(self._suffix)}"))

    def url(self, *parts) -> str:
        return self.base + self.path(*parts)

    def hits_of(self, url: str) -> int:
        with self.lock:
            return self.hits[url.removeprefix(self.base)]


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    from pipeline.synthetic import write_index_clip

    return write_index_clip(tmp_path_factory.mktemp("video") / "a.mp4", 20)


@pytest.fixture(scope="module")
def server(video):
    srv = _Server(video.read_bytes())
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.stop.set()  # wakes sleeping handlers
        srv.shutdown()
        srv.server_close()
        thread.join(5)


@pytest.fixture(autouse=True)
def _isolated(monkeypatch):
    """No proxy for 127.0.0.1, and a fresh requests session per test (the module keeps one per process)."""
    monkeypatch.setenv("NO_PROXY", LOCAL_HOSTS)
    monkeypatch.setenv("no_proxy", LOCAL_HOSTS)
    monkeypatch.setattr(fetch_mod, "_session", None)
    yield
    if fetch_mod._session is not None:
        fetch_mod._session.close()


@pytest.fixture
def sleeps(monkeypatch) -> list[float]:
    """The backoff sleeps of pipeline.fetch, recorded instead of slept (the rest of ``time`` is untouched)."""
    recorded: list[float] = []
    monkeypatch.setattr(fetch_mod, "time", SimpleNamespace(monotonic=time.monotonic, sleep=recorded.append))
    return recorded


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fetch_error(location: str, config: FetchConfig) -> FetchError:
    with pytest.raises(FetchError) as info:
        fetch(location, config)
    return info.value


def wait_for(condition, seconds: float = 3.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


FAST = FetchConfig(timeout=5.0, retries=0, backoff=0.01, max_bytes=10 * 2**20)


# --------------------------------------------------------------------------------------------------
# Local files


def test_local_good_file_returns_the_path_unchanged(video):
    assert fetch(str(video), FAST) == str(video)
    assert check_local(str(video)) == str(video)


def test_local_missing_file(tmp_path):
    e = fetch_error(str(tmp_path / "nope.mp4"), FAST)
    assert e.reason == MISSING_FILE, e.detail
    assert "nope.mp4" in e.detail


def test_local_empty_file(tmp_path):
    path = tmp_path / "empty.mp4"
    path.write_bytes(b"")
    e = fetch_error(str(path), FAST)
    assert e.reason == EMPTY_FILE, e.detail
    assert "0 bytes" in e.detail


def test_local_directory_is_missing_file(tmp_path):
    (tmp_path / "dir.mp4").mkdir()
    assert fetch_error(str(tmp_path / "dir.mp4"), FAST).reason == MISSING_FILE


def test_local_broken_symlink_is_missing_file(tmp_path):
    link = tmp_path / "link.mp4"
    link.symlink_to(tmp_path / "gone.mp4")
    assert fetch_error(str(link), FAST).reason == MISSING_FILE


def test_local_path_never_goes_to_the_network(tmp_path, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("a local path was downloaded")

    monkeypatch.setattr(fetch_mod, "download", no_download)
    path = tmp_path / "http_lookalike.mp4"
    path.write_bytes(b"x")
    assert fetch(str(path), FAST) == str(path)


def test_fetch_error_message_carries_reason_and_detail():
    e = FetchError(TIMEOUT, "took too long")
    assert (e.reason, e.detail, str(e)) == (TIMEOUT, "took too long", "timeout: took too long")


# --------------------------------------------------------------------------------------------------
# Successful downloads


def test_download_returns_the_exact_bytes(server, video):
    url = server.url("good")
    data = fetch(url, FAST)
    assert isinstance(data, bytes)
    assert data == video.read_bytes()
    assert server.hits_of(url) == 1


def test_download_chunked_without_content_length(server, video):
    assert fetch(server.url("chunked"), FAST) == video.read_bytes()


def test_download_follows_redirects(server, video):
    assert fetch(server.url("redirect"), FAST) == video.read_bytes()


def test_uppercase_scheme_is_a_download(server, video):
    url = server.url("good").replace("http://", "HTTP://")
    assert fetch(url, FAST) == video.read_bytes()


def test_download_sends_the_configured_user_agent(server):
    url = server.url("good")
    fetch(url, FetchConfig(timeout=5, retries=0, user_agent="fitclip-test/9"))
    assert server.user_agents[url.removeprefix(server.base)] == "fitclip-test/9"


def test_each_call_uses_its_own_user_agent(server):
    """The per-process session must not pin the first config's User-Agent."""
    first, second = server.url("good"), server.url("good") + "?again"
    fetch(first, FetchConfig(timeout=5, retries=0, user_agent="agent-one/1"))
    fetch(second, FetchConfig(timeout=5, retries=0, user_agent="agent-two/2"))
    assert server.user_agents[first.removeprefix(server.base)] == "agent-one/1"
    assert server.user_agents[second.removeprefix(server.base)] == "agent-two/2"


def test_session_is_reused_across_downloads(server, video):
    fetch(server.url("good"), FAST)
    first = fetch_mod._session
    fetch(server.url("good"), FAST)
    assert first is not None and fetch_mod._session is first


@pytest.mark.parametrize("mode", ["length", "close"])
def test_exactly_max_bytes_is_allowed(server, mode):
    config = FetchConfig(timeout=5, retries=0, backoff=0.01, max_bytes=100_000)
    assert fetch(server.url("exact", 100_000, mode), config) == b"e" * 100_000


# --------------------------------------------------------------------------------------------------
# HTTP errors and retries


@pytest.mark.parametrize("code", [400, 401, 403, 404, 410, 204])
def test_non_transient_status_fails_at_once(server, sleeps, code):
    url = server.url("status", code)
    e = fetch_error(url, FetchConfig(timeout=5, retries=3, backoff=0.01))
    assert e.reason == HTTP_ERROR, e.detail
    assert str(code) in e.detail
    assert server.hits_of(url) == 1  # no retry
    assert sleeps == []
    assert not e.transient  # pipeline.shard --retry_failed leaves it


def test_503_then_success_is_retried(server, video, sleeps):
    url = server.url("flaky", 503, 1)
    data = fetch(url, FetchConfig(timeout=5, retries=2, backoff=0.01))
    assert data == video.read_bytes()
    assert server.hits_of(url) == 2
    assert sleeps == [0.01]


def test_429_then_success_is_retried(server, video, sleeps):
    url = server.url("flaky", 429, 2)
    assert fetch(url, FetchConfig(timeout=5, retries=2, backoff=0.01)) == video.read_bytes()
    assert server.hits_of(url) == 3
    assert sleeps == [0.01, 0.02]


def test_503_without_retries_fails(server, sleeps):
    url = server.url("flaky", 503, 1)
    e = fetch_error(url, FetchConfig(timeout=5, retries=0, backoff=0.01))
    assert e.reason == HTTP_ERROR, e.detail
    assert "503" in e.detail
    assert server.hits_of(url) == 1
    assert sleeps == []
    assert e.transient  # pipeline.shard --retry_failed tries it again


@pytest.mark.parametrize("retries", [0, 1, 3])
def test_permanent_500_makes_retries_plus_one_attempts(server, sleeps, retries):
    url = server.url("status", 500)
    e = fetch_error(url, FetchConfig(timeout=5, retries=retries, backoff=0.01))
    assert e.reason == HTTP_ERROR, e.detail
    assert "500" in e.detail
    assert f"after {retries + 1} attempts" in e.detail
    assert server.hits_of(url) == retries + 1
    assert sleeps == [0.01 * 2**k for k in range(retries)]  # exponential backoff


def test_backoff_really_sleeps(server):
    """Without the sleep recorder: two retries at backoff 0.1 take >= 0.1 + 0.2 s."""
    url = server.url("status", 502)
    start = time.monotonic()
    e = fetch_error(url, FetchConfig(timeout=5, retries=2, backoff=0.1))
    assert e.reason == HTTP_ERROR, e.detail
    assert time.monotonic() - start >= 0.3
    assert server.hits_of(url) == 3


# --------------------------------------------------------------------------------------------------
# Connection problems


def test_closed_port_is_unreachable_and_retried(sleeps):
    url = f"http://127.0.0.1:{closed_port()}/video.mp4"
    e = fetch_error(url, FetchConfig(timeout=2, retries=2, backoff=0.01))
    assert e.reason == UNREACHABLE, e.detail
    assert "after 3 attempts" in e.detail
    assert sleeps == [0.01, 0.02]
    assert e.transient


def test_invalid_url_is_unreachable_without_retry(sleeps):
    e = fetch_error("http://", FetchConfig(timeout=2, retries=3, backoff=0.01))
    assert e.reason == UNREACHABLE, e.detail
    assert sleeps == []
    assert not e.transient


@pytest.mark.parametrize(
    "failure, transient",
    [
        ({"reason": "timeout", "detail": "ReadTimeout"}, True),
        ({"reason": "unreachable", "detail": "ConnectionError: refused (after 3 attempts)"}, True),
        ({"reason": "http_error", "detail": "HTTP 503 Service Unavailable (after 3 attempts)"}, True),
        ({"reason": "http_error", "detail": "HTTP 429 Too Many Requests (after 3 attempts)"}, True),
        ({"reason": "http_error", "detail": "HTTP 404 Not Found"}, False),
        ({"reason": "undecodable", "detail": "moov atom not found"}, False),
        ({"reason": "http_error", "detail": "HTTP 503 Service Unavailable", "transient": False}, False),  # recorded
        ({"reason": "missing_file", "detail": "v/1.mp4 does not exist", "transient": True}, True),
    ],
)
def test_stats_written_before_the_transient_field_are_judged_by_reason_and_detail(failure, transient):
    from pipeline.fetch import is_transient

    assert is_transient(failure) is transient


def test_body_shorter_than_content_length_is_unreachable_and_retried(server, sleeps):
    url = server.url("short")
    e = fetch_error(url, FetchConfig(timeout=5, retries=1, backoff=0.01))
    assert e.reason == UNREACHABLE, e.detail
    assert "after 2 attempts" in e.detail
    assert server.hits_of(url) == 2
    assert sleeps == [0.01]


def test_slow_download_times_out(server, sleeps):
    """Bytes keep coming (each gap far below the read timeout) but the whole body takes longer than the timeout."""
    url = server.url("slow")
    e = fetch_error(url, FetchConfig(timeout=0.5, retries=1, backoff=0.01))
    assert e.reason == TIMEOUT, e.detail
    assert "after 2 attempts" in e.detail
    assert server.hits_of(url) == 2


def test_slow_download_is_cut_off_near_the_timeout(server, sleeps):
    """The total timeout holds while bytes trickle in (a check only between 64 KiB reads would wait for the body)."""
    url = server.url("slow")
    start = time.monotonic()
    e = fetch_error(url, FetchConfig(timeout=0.5, retries=0, backoff=0.01))
    elapsed = time.monotonic() - start
    assert e.reason == TIMEOUT, e.detail
    trickle = TRICKLE_BYTES * TRICKLE_GAP
    assert elapsed < 1.5, f"a 0.5 s timeout took {elapsed:.2f} s (the server trickled for {trickle:g} s)"


def test_stalled_body_is_a_timeout(server, sleeps):
    """A read timeout mid-body is a timeout (requests' iter_content would report it as a ConnectionError)."""
    url = server.url("stall")
    start = time.monotonic()
    e = fetch_error(url, FetchConfig(timeout=0.5, retries=0, backoff=0.01))
    assert time.monotonic() - start < 2.5
    assert e.reason == TIMEOUT, e.detail


def test_stalled_body_fails_quickly_as_transient(server, sleeps):
    """Whatever the reason's name, a stalled body ends near the timeout and is retried."""
    url = server.url("stall")
    start = time.monotonic()
    e = fetch_error(url, FetchConfig(timeout=0.5, retries=1, backoff=0.01))
    assert time.monotonic() - start < 2.5
    assert e.reason in (TIMEOUT, UNREACHABLE)
    assert server.hits_of(url) == 2
    assert sleeps == [0.01]


# --------------------------------------------------------------------------------------------------
# Size limits and empty bodies


def test_declared_huge_content_length_is_too_large_without_reading(server, sleeps):
    url = server.url("huge")
    start = time.monotonic()
    e = fetch_error(url, FetchConfig(timeout=5, retries=2, backoff=0.01, max_bytes=2**20))
    assert time.monotonic() - start < 1.0  # it did not wait for the (endless) body
    assert e.reason == TOO_LARGE, e.detail
    assert str(HUGE) in e.detail
    assert server.hits_of(url) == 1  # not retried
    assert sleeps == []
    path = url.removeprefix(server.base)
    assert wait_for(lambda: path in server.disconnected), "the client kept the connection open"
    assert server.sent[path] < 200 * 1024


def test_content_length_one_over_the_limit(server, video):
    size = len(video.read_bytes())
    tight = FetchConfig(timeout=5, retries=0, backoff=0.01, max_bytes=size - 1)
    assert fetch_error(server.url("good"), tight).reason == TOO_LARGE
    assert fetch(server.url("good"), FetchConfig(timeout=5, retries=0, max_bytes=size)) == video.read_bytes()


@pytest.mark.parametrize("mode", ["chunked", "close"])
def test_streamed_body_over_the_limit_is_too_large(server, sleeps, mode):
    url = server.url("stream", mode)
    max_bytes = 100_000
    e = fetch_error(url, FetchConfig(timeout=5, retries=2, backoff=0.01, max_bytes=max_bytes))
    assert e.reason == TOO_LARGE, e.detail
    assert str(max_bytes) in e.detail
    assert server.hits_of(url) == 1
    assert sleeps == []
    path = url.removeprefix(server.base)
    # The client hung up long before the server's 4 MiB were all sent.
    assert wait_for(lambda: path in server.disconnected), "the client read the whole stream"
    assert server.sent[path] < STREAM_PIECES * STREAM_PIECE


@pytest.mark.parametrize("mode", ["length", "close"])
def test_one_byte_over_the_limit_without_declared_length(server, mode):
    config = FetchConfig(timeout=5, retries=0, backoff=0.01, max_bytes=99_999)
    e = fetch_error(server.url("exact", 100_000, mode), config)
    assert e.reason == TOO_LARGE, e.detail


@pytest.mark.parametrize("mode", ["length", "close"])
def test_empty_200_is_empty_file(server, sleeps, mode):
    url = server.url("empty", mode)
    e = fetch_error(url, FetchConfig(timeout=5, retries=2, backoff=0.01))
    assert e.reason == EMPTY_FILE, e.detail
    assert server.hits_of(url) == 1  # not retried
    assert sleeps == []


def test_gzip_encoded_incompressible_download_is_accepted(server):
    """Content-Length is the encoded size: a decoded body shorter than it is complete, not cut short."""
    assert len(gzip.compress(GZIP_BODIES["noise"])) > len(GZIP_BODIES["noise"])  # the premise of this test
    assert fetch(server.url("gzip", "noise"), FAST) == GZIP_BODIES["noise"]


def test_gzip_encoded_compressible_download_is_decoded(server):
    assert fetch(server.url("gzip", "text"), FAST) == GZIP_BODIES["text"]


def test_undecodable_content_encoding_fails_without_retry(server, sleeps):
    url = server.url("badgzip")
    e = fetch_error(url, FetchConfig(timeout=5, retries=2, backoff=0.01))
    assert e.reason == UNREACHABLE, e.detail
    assert server.hits_of(url) == 1
    assert sleeps == []


def test_download_function_is_what_fetch_uses_for_urls(server, video):
    assert download(server.url("good"), FAST) == fetch(server.url("good"), FAST)


# --------------------------------------------------------------------------------------------------
# End to end: the CLI turns each failure into a stats entry with its reason


def test_cli_end_to_end_counts_failures_by_reason(server, video, tmp_path):
    import webdataset as wds

    from pipeline.frames import decode_frames
    from pipeline.synthetic import read_frame_index

    rows = {
        "good1": (server.url("good"), "a clip that shows its frame numbers"),
        "missing404": (server.url("status", 404), "gone"),
        "slow1": (server.url("slow"), "trickles"),
        "huge1": (server.url("huge"), "too big"),
        "empty1": (server.url("empty", "length"), "nothing"),
        "closed1": (f"http://127.0.0.1:{closed_port()}/x.mp4", "nobody home"),
    }
    src = write_csv(
        tmp_path / "webvid.csv",
        [[videoid, caption, 1, "000001_000050", "PT00H00M01S", url] for videoid, (url, caption) in rows.items()],
    )
    out = tmp_path / "shards"
    env = {**os.environ, "NO_PROXY": LOCAL_HOSTS, "no_proxy": LOCAL_HOSTS}
    cmd = [
        sys.executable,
        "-m",
        "pipeline.shard",
        "--src",
        str(src),
        "--out",
        str(out),
        "--workers",
        "1",
        "--samples_per_shard",
        "10",
        "--timeout",
        "1",
        "--retries",
        "0",
        "--max_mb",
        "1",
        "--progress",
        "False",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=45)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    stats = json.loads((out / "000000_stats.json").read_text())
    assert stats["count"] == 6
    assert stats["ok"] == 1
    reasons = {f["videoid"]: f["reason"] for f in stats["failures"]}
    assert reasons == {
        "missing404": HTTP_ERROR,
        "slow1": TIMEOUT,
        "huge1": TOO_LARGE,
        "empty1": EMPTY_FILE,
        "closed1": UNREACHABLE,
    }, stats["failures"]
    assert stats["failed"] == {EMPTY_FILE: 1, HTTP_ERROR: 1, TIMEOUT: 1, TOO_LARGE: 1, UNREACHABLE: 1}
    by_id = {f["videoid"]: f for f in stats["failures"]}
    assert "404" in by_id["missing404"]["detail"]
    assert str(HUGE) in by_id["huge1"]["detail"]  # rejected from the header, with --max_mb 1 read as MiB
    assert str(2**20) in by_id["huge1"]["detail"]
    assert [by_id[v]["row"] for v in ("missing404", "slow1", "huge1", "empty1", "closed1")] == [1, 2, 3, 4, 5]

    samples = list(wds.WebDataset(str(out / "000000.tar"), shardshuffle=False).decode("pil"))
    assert [s["__key__"] for s in samples] == ["good1"]
    sample = samples[0]
    jpgs = sorted(k for k in sample if k.endswith(".jpg"))
    assert jpgs == ["0.jpg", "1.jpg", "2.jpg", "3.jpg"]
    assert sample["txt"] == "a clip that shows its frame numbers"
    assert sample["json"]["videoid"] == "good1"
    assert sample["json"]["source"] == rows["good1"][0]
    indices = [read_frame_index(sample[k]) for k in jpgs]
    # Midpoints of 4 equal segments of a 20-frame clip: one frame from each 5-frame segment, in order ...
    assert all(5 * k <= i < 5 * (k + 1) for k, i in enumerate(indices)), indices
    # ... and the same frames as decoding the local file directly.
    assert indices == [read_frame_index(im) for im in decode_frames(str(video), 4, 256).images]


def test_a_missing_file_whose_path_has_backslashes_says_they_separate_no_folders(tmp_path):
    """A CSV written on Windows (``vids\\a.mp4``): the file is there as ``vids/a.mp4``, and the row failed as a plain
    missing_file."""
    from pipeline.fetch import FetchError, check_local

    with pytest.raises(FetchError) as e:
        check_local(str(tmp_path) + "/vids\\a.mp4")
    assert str(e.value).endswith("does not exist or is not a file (\\ separates no folders here: write /)")
    with pytest.raises(FetchError) as e:
        check_local(str(tmp_path / "b.mp4"))
    assert str(e.value).endswith("does not exist or is not a file")
