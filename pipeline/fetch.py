"""Getting a video's bytes: local files, or http(s) downloads with a total timeout, retries and a size limit.

Downloads use ``requests`` (one session per worker process, for connection
reuse). Transient failures (connection errors, timeouts, HTTP 429 and 5xx) are
retried with exponential backoff; other HTTP statuses fail at once.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

import requests
import urllib3

from pipeline.source import URL_SCHEMES

# Failure reasons.
MISSING_FILE = "missing_file"
EMPTY_FILE = "empty_file"
HTTP_ERROR = "http_error"
UNREACHABLE = "unreachable"
TIMEOUT = "timeout"
TOO_LARGE = "too_large"

_CHUNK = 1 << 16


class FetchError(Exception):
    """A video that could not be fetched. ``reason`` is a short stable code for stats; ``transient`` says a later
    try may succeed (a timeout, a refused or dropped connection, HTTP 429 or 5xx): ``pipeline.shard
    --retry_failed`` tries those videos again."""

    transient = False

    def __init__(self, reason: str, detail: str, transient: bool | None = None):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        if transient is not None:
            self.transient = transient


@dataclass(frozen=True)
class FetchConfig:
    """Limits for downloads."""

    timeout: float = 60.0  # seconds for one whole download attempt (connect + all bytes)
    retries: int = 2  # extra attempts after a transient failure
    backoff: float = 1.0  # seconds before the first retry; doubled each time
    max_bytes: int = 200 * 2**20  # larger downloads fail as too_large
    user_agent: str = "fitclip-pipeline/0.1"


_session: requests.Session | None = None


def _get_session() -> requests.Session:
    """One session per process, for connection reuse (created lazily, in the worker)."""
    global _session
    if _session is None:
        _session = requests.Session()
    return _session


def fetch(location: str, config: FetchConfig = FetchConfig()) -> str | bytes:
    """A local path (checked to be a non-empty file) or the downloaded bytes of a URL.

    Raises:
        FetchError: ``missing_file``, ``empty_file``, ``http_error``,
            ``unreachable``, ``timeout`` or ``too_large``.
    """
    if location.lower().startswith(URL_SCHEMES):
        return download(location, config)
    return check_local(location)


def check_local(path: str) -> str:
    p = Path(path)
    try:
        if not p.is_file():
            # a CSV made on Windows: a backslash is a character of a name here, not a folder separator
            slashes = " (\\ separates no folders here: write /)" if "\\" in path else ""
            raise FetchError(MISSING_FILE, f"{path} does not exist or is not a file{slashes}")
        if p.stat().st_size == 0:
            raise FetchError(EMPTY_FILE, f"{path} is 0 bytes")
    except OSError as e:
        raise FetchError(MISSING_FILE, f"{path}: {e}") from e
    return path


def download(url: str, config: FetchConfig = FetchConfig()) -> bytes:
    """GET ``url`` with retries for transient errors; see :class:`FetchConfig`."""
    delay = config.backoff
    for attempt in range(config.retries + 1):
        try:
            return _download_once(url, config)
        except _Transient as e:
            if attempt == config.retries:
                raise FetchError(e.reason, f"{e.detail} (after {attempt + 1} attempts)", transient=True) from None
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")  # pragma: no cover


class _Transient(FetchError):
    """A failure worth retrying."""

    transient = True


def is_transient(failure: dict) -> bool:
    """Whether a failure record of a shard's stats may pass on a later try. Records made before the ``transient``
    field existed are judged by their reason and detail."""
    if "transient" in failure:
        return bool(failure["transient"])
    detail = failure.get("detail", "")
    return failure.get("reason") in (TIMEOUT, UNREACHABLE) or (
        failure.get("reason") == HTTP_ERROR and re.match(r"HTTP (429|5\d\d)\b", detail) is not None
    )


def _download_once(url: str, config: FetchConfig) -> bytes:
    deadline = time.monotonic() + config.timeout
    headers = {"User-Agent": config.user_agent}
    try:
        # The timeout tuple bounds the connection and each read; _read_body bounds the total.
        timeout = (min(10.0, config.timeout), config.timeout)
        with _get_session().get(url, stream=True, timeout=timeout, headers=headers) as response:
            status = response.status_code
            if status == 429 or status >= 500:
                raise _Transient(HTTP_ERROR, f"HTTP {status} {response.reason}")
            if status != 200:
                raise FetchError(HTTP_ERROR, f"HTTP {status} {response.reason}")
            declared = response.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > config.max_bytes:
                raise FetchError(TOO_LARGE, f"Content-Length {declared} > limit {config.max_bytes}")
            data = _read_body(response.raw, deadline, config)
    except (requests.Timeout, urllib3.exceptions.TimeoutError) as e:
        raise _Transient(TIMEOUT, f"{type(e).__name__}: {_short(e)}") from None
    except (requests.ConnectionError, urllib3.exceptions.ProtocolError) as e:
        # ProtocolError: the connection closed before Content-Length bytes came (urllib3 checks it)
        raise _Transient(UNREACHABLE, f"{type(e).__name__}: {_short(e)}") from None
    except (requests.RequestException, urllib3.exceptions.HTTPError) as e:  # bad URL, bad encoding: no retry
        raise FetchError(UNREACHABLE, f"{type(e).__name__}: {_short(e)}") from None
    if not data:
        raise FetchError(EMPTY_FILE, "the server sent 0 bytes")
    return data


def _read_body(raw: urllib3.HTTPResponse, deadline: float, config: FetchConfig) -> bytes:
    """Read the (decoded) body as bytes arrive, enforcing the size limit and the total deadline.

    ``read1`` returns as soon as any bytes are available, so a server trickling
    bytes is cut off at the deadline; before each read the socket's timeout is
    lowered to the time left, so a stalled one is too.
    """
    chunks, size = [], 0
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise _Transient(TIMEOUT, f"download took more than {config.timeout:g} s")
        _set_read_timeout(raw, left)
        chunk = raw.read1(_CHUNK, decode_content=True)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > config.max_bytes:
            raise FetchError(TOO_LARGE, f"more than {config.max_bytes} bytes")
        chunks.append(chunk)


def _set_read_timeout(raw: urllib3.HTTPResponse, seconds: float) -> None:
    # urllib3 exposes no public way to change the read timeout mid-body; where this private
    # attribute is missing, each read is still bounded by the request's read timeout.
    sock = getattr(getattr(raw, "_connection", None), "sock", None)
    if sock is not None:
        sock.settimeout(max(seconds, 0.001))


def _short(e: Exception) -> str:
    return str(e)[:300]
