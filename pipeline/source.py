"""Reading a WebVid-style CSV as a stream of validated rows, and resolving where each video lives.

WebVid's CSVs (``results_2M_train.csv`` and friends) have the columns
``videoid,name,page_idx,page_dir,duration,contentUrl``, in differing orders and
not always all of them; captions may contain commas and quoted newlines. The
file is streamed with the stdlib ``csv`` module: memory does not grow with the
number of rows (the duplicate check keeps 8 bytes per row, see :class:`SeenKeys`).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit
from urllib.request import url2pathname

import numpy as np

from pipeline.writer import sample_key

URL_SCHEMES = ("http://", "https://")

# Row-level failure reasons (the rest come from fetching and decoding).
EMPTY_ROW = "empty_row"
MALFORMED_ROW = "malformed_row"
MISSING_VIDEOID = "missing_videoid"
EMPTY_CAPTION = "empty_caption"
LONG_CAPTION = "long_caption"
DUPLICATE_VIDEOID = "duplicate_videoid"
MISSING_LOCATION = "missing_location"
UNSAFE_PATH = "unsafe_path"
UNSUPPORTED_URL = "unsupported_url"
# A WebVid caption is a line; CLIP reads 77 tokens of it (a few hundred characters). Longer is a scraped page or a
# broken field, and costs the tokenizer about 4 s per MB each time the sample is drawn.
MAX_CAPTION_CHARS = 10_000


class CsvError(ValueError):
    """The CSV as a whole cannot be used (missing file, unreadable, missing columns)."""


@dataclass(frozen=True)
class Columns:
    """Column names in the CSV; the defaults are WebVid's."""

    videoid: str = "videoid"  # unique id of the video; becomes the sample key
    caption: str = "name"  # the caption text
    url: str = "contentUrl"  # http(s) URL, or a local path (absolute or relative to the CSV's folder)
    page_dir: str = "page_dir"  # sub-folder of --video_root holding the video
    duration: str = "duration"  # ISO 8601 duration ("PT00H00M17S"): stored as csv_duration, not used to sample


@dataclass(frozen=True)
class Row:
    """One data row of the CSV, validated.

    ``error`` is ``(reason, detail)`` for a row that cannot become a sample;
    otherwise ``key``, ``caption`` and ``location`` are set.
    """

    index: int  # 0-based data row number, in file order
    videoid: str
    key: str = ""
    caption: str = ""
    location: str = ""  # http(s) URL or absolute local path
    csv_duration: float | None = None
    error: tuple[str, str] | None = None


def read_header(path: str | Path, columns: Columns, video_root: str | Path | None = None) -> list[str]:
    """The CSV's header, after checking the file and the columns this run needs.

    Raises:
        CsvError: naming the file or the missing column, and how to fix it.
    """
    path = Path(path)
    if not path.exists():
        raise CsvError(f"CSV not found: {path}")
    if not path.is_file():
        raise CsvError(f"not a file: {path} (pass the CSV file itself with --src)")
    try:
        with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
            header = next(csv.reader(f), None)
    except (OSError, csv.Error) as e:
        raise CsvError(f"cannot read the CSV {path}: {e}") from e
    if header and any(_text(h) is None for h in header):
        raise CsvError(f"cannot read the CSV {path}: its header is not UTF-8 text (is it a CSV file?)")
    if not header or not any(h.strip() for h in header):
        raise CsvError(
            f"{path} is empty or has no header line; expected columns like {','.join(Columns().__dict__.values())}"
        )
    header = [h.strip() for h in header]
    missing = [c for c in (columns.videoid, columns.caption) if c not in header]
    if video_root is None and columns.url not in header:
        missing.append(columns.url)
    # optional columns, but one named on the command line must be there: else every video would be a missing_file
    # (a misspelt --page_dir_col) or every csv_duration null, in silence
    optional = {"duration": columns.duration, **({"page_dir": columns.page_dir} if video_root is not None else {})}
    missing += [c for f, c in optional.items() if c not in header and c != getattr(Columns, f) and c not in missing]
    if missing:
        flags = {
            columns.videoid: "--id_col",
            columns.caption: "--caption_col",
            columns.url: "--url_col",
            columns.page_dir: "--page_dir_col",
            columns.duration: "--duration_col",
        }
        hints = ", ".join(f"{flags[m]} NAME to rename '{m}'" for m in missing)
        where = (
            " (or pass --video_root DIR to find videos as DIR/{page_dir}/{videoid}.mp4)"
            if columns.url in missing
            else ""
        )
        raise CsvError(f"{path}: missing column(s) {missing}; the header is {header}. Use {hints}{where}.")
    used = [c for c in dataclasses.astuple(columns) if c]
    twice = sorted({c for c in used if header.count(c) > 1})
    if twice:  # a row's fields become a dict by name: the last column of the name would win, in silence
        raise CsvError(f"{path}: the header names column(s) {twice} more than once; rename all but one")
    return header


# A record over more lines than this is a quote that never closes: a caption is a line or a few, and the reader
# would otherwise hold the rest of the file in memory (twice: as the field, and as the lines to read again)
MAX_RECORD_LINES = 1000


def _reader(path: Path) -> Iterator[list[str] | csv.Error]:
    """Raw CSV records after the header; a record the csv module rejects is yielded as the error.

    A record over several lines is yielded as an error too, and the lines after its first are read again, where
    its quotes do not pair as a CSV's must (a quote closed by a character other than a comma or the line's end, or
    never closed), where it has another number of fields than the header, or where it runs past
    ``MAX_RECORD_LINES``: a quote that never closes would otherwise run on into the rows after it, and they would
    vanish into one row (taking the video of the row where it closed). A quoted caption over two lines is still one
    record."""
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    # surrogateescape: a stray invalid byte fails that row (see _text), not the whole run.
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        lines = _Lines(f)
        reader = csv.reader(lines)
        width = len(next(reader, None) or ())
        while True:
            first = lines.taken = []
            try:
                record = next(reader)
            except StopIteration:
                return
            except (csv.Error, _TooLong) as e:
                record = e
            if len(first) > 1:
                problem = _multi_line_problem(record, width, [line for _, line in first])
                if problem:
                    yield csv.Error(
                        f"{problem}, in a record over lines {first[0][0]}-{first[-1][0]} (an unclosed quote?); the "
                        "lines after its first are read again as rows"
                    )
                    lines.read_again(first[1:])
                    continue
            yield record


def _multi_line_problem(record: list[str] | Exception, width: int, text: list[str]) -> str:
    """Why a record read over several lines (``text``) is not one ("" if it is)."""
    if isinstance(record, _TooLong):
        return f"still open after {MAX_RECORD_LINES} lines"
    if isinstance(record, csv.Error):
        return str(record)
    if len(record) != width:
        return f"{len(record)} fields, the header has {width}"
    try:  # the lenient reader took a quote closed mid-field as text: a strict one refuses it
        list(csv.reader(text, strict=True))
    except csv.Error as e:
        return str(e)
    return ""


class _TooLong(Exception):
    """A record ran past ``MAX_RECORD_LINES``."""


class _Lines:
    """A file's lines, numbered from 1, for ``csv.reader``; the lines of the record being read are kept in
    ``taken``, and :meth:`read_again` gives lines back (the reader asks for one line at a time, and nothing is
    held between records)."""

    def __init__(self, f):
        self._numbered = enumerate(f, start=1)
        self._again: list[tuple[int, str]] = []
        self.taken: list[tuple[int, str]] = []

    def __iter__(self):
        return self

    def __next__(self) -> str:
        if len(self.taken) >= MAX_RECORD_LINES:
            raise _TooLong
        line = self._again.pop() if self._again else next(self._numbered)
        self.taken.append(line)
        return line[1]

    def read_again(self, lines: list[tuple[int, str]]) -> None:
        self._again.extend(reversed(lines))


def count_rows(path: str | Path) -> int:
    """Number of data rows (a cheap pass without validation; for progress bars)."""
    return sum(1 for _ in _reader(Path(path)))


def parse_iso_duration(text: str) -> float | None:
    """'PT00H00M17S' -> 17.0, 'P1DT1S' -> 86401.0; None if it is not an ISO 8601 duration of days and time."""
    m = re.fullmatch(r"\s*P(?:(\d+)D)?T?(?:(\d+(?:\.\d+)?)H)?(?:(\d+(?:\.\d+)?)M)?(?:(\d+(?:\.\d+)?)S)?\s*", text or "")
    if not m or not any(m.groups()):
        return None
    d, h, mnt, s = (float(g) if g else 0.0 for g in m.groups())
    return d * 86400 + h * 3600 + mnt * 60 + s


def _text(value: str) -> str | None:
    """The value if it is valid UTF-8 text (no escaped bad bytes), else None."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return value


def resolve_location(
    fields: dict[str, str], columns: Columns, csv_dir: Path, video_root: Path | None, videoid: str
) -> tuple[str, tuple[str, str] | None]:
    """Where a row's video is: ``(location, None)`` or ``("", (reason, detail))``.

    With ``video_root``: ``video_root/{page_dir}/{videoid}.mp4``, which must stay
    inside ``video_root``. Otherwise the URL column: an http(s) URL, a
    ``file://`` URL, or a path (absolute, or relative to the CSV's folder).
    """
    if video_root is not None:
        page_dir = (fields.get(columns.page_dir) or "").strip()
        parts = [*PurePosixPath(page_dir).parts, f"{videoid}.mp4"] if page_dir else [f"{videoid}.mp4"]
        if any(p in ("..", "/", "") or "/" in p or "\\" in p for p in parts) or PurePosixPath(page_dir).is_absolute():
            slashes = " (\\ separates no folders here: write /)" if "\\" in page_dir + videoid else ""
            return "", (UNSAFE_PATH, f"page_dir={page_dir!r} videoid={videoid!r} would leave --video_root{slashes}")
        return str(video_root.joinpath(*parts)), None
    url = (fields.get(columns.url) or "").strip()
    if not url:
        return "", (MISSING_LOCATION, f"empty {columns.url}")
    if url.lower().startswith(URL_SCHEMES):
        return url, None
    if url.lower().startswith("file:"):  # file:///a%20b/c.mp4, file://localhost/..., file:relative/to/the/csv
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            return "", (UNSUPPORTED_URL, f"{url[:200]}: a file URL on another host (mount it and give its path)")
        url = url2pathname(parts.path)
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]+://", url):
        return "", (UNSUPPORTED_URL, f"{url[:200]} (supported: http, https, file, local paths)")
    path = Path(url)
    return str(path if path.is_absolute() else csv_dir / path), None


class SeenKeys:
    """Set of sample keys seen so far, at 8 bytes per key (64-bit hashes in sorted numpy runs).

    A Python ``set`` of 2.5M strings costs ~200 MB; this costs 20 MB. The chance
    that two of 10M distinct keys share a 64-bit hash is about 3e-6. Keys are
    checked a batch at a time (one ``searchsorted`` per run and batch): one at a
    time, 2.5M keys took 28 s, most of a rerun's reading of WebVid's CSV.
    """

    def __init__(self) -> None:
        self._runs: list[np.ndarray] = []  # sorted uint64 arrays, sizes roughly doubling

    @staticmethod
    def _hash(key: str) -> int:
        return int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=8).digest(), "little")

    def add_many(self, keys: list[str]) -> list[bool]:
        """Record ``keys``, in order; for each, False if it was already there (or earlier in ``keys``)."""
        if not keys:
            return []
        hashes = np.fromiter((self._hash(k) for k in keys), dtype=np.uint64, count=len(keys))
        taken = np.zeros(len(keys), dtype=bool)
        for run in self._runs:
            i = np.searchsorted(run, hashes)
            taken |= run[np.minimum(i, len(run) - 1)] == hashes
        _, first = np.unique(hashes, return_index=True)
        again = np.ones(len(keys), dtype=bool)
        again[first] = False  # the first of equal keys in the batch is new (if no run holds it), the others not
        taken |= again
        run = np.sort(hashes[~taken])
        while self._runs and len(self._runs[-1]) <= len(run):  # merge equal-sized runs (LSM style)
            run = np.concatenate([self._runs.pop(), run])
            run.sort()  # in place: no third copy at the peak
        if len(run):
            self._runs.append(run)
        return (~taken).tolist()


def iter_rows(
    path: str | Path,
    columns: Columns = Columns(),
    video_root: str | Path | None = None,
) -> Iterator[Row]:
    """Stream the CSV's rows, validated, in file order. Call :func:`read_header` first."""
    path = Path(path)
    header = read_header(path, columns, video_root)
    root = Path(video_root).resolve() if video_root is not None else None
    csv_dir = path.resolve().parent
    seen = SeenKeys()
    records = enumerate(_reader(path))
    while batch := [_validate(i, record, header, columns, csv_dir, root) for i, record in islice(records, 512)]:
        claimed = [j for j, row in enumerate(batch) if row.error is None]
        for j, new in zip(claimed, seen.add_many([batch[j].key for j in claimed]), strict=True):
            if not new:  # a later row of a video: the first one in file order keeps the key
                row = batch[j]
                taken = f"key {row.key!r} already taken by an earlier row"
                batch[j] = Row(row.index, row.videoid, error=(DUPLICATE_VIDEOID, taken))
        yield from batch


def _validate(
    index: int,
    record: list[str] | csv.Error,
    header: list[str],
    columns: Columns,
    csv_dir: Path,
    video_root: Path | None,
) -> Row:
    """The row, checked but for its key's being taken by an earlier row (``iter_rows`` checks a batch at once)."""
    if isinstance(record, csv.Error):
        return Row(index, "", error=(MALFORMED_ROW, f"CSV syntax: {record}"))
    if not record or all(not v.strip() for v in record):
        return Row(index, "", error=(EMPTY_ROW, "blank line or all fields empty"))
    if len(record) != len(header):
        return Row(index, "", error=(MALFORMED_ROW, f"{len(record)} fields, the header has {len(header)}"))
    fields = dict(zip(header, record, strict=True))
    raw_id = fields[columns.videoid].strip()
    videoid = _text(raw_id)
    if videoid is None:
        return Row(
            index,
            raw_id.encode("utf-8", "backslashreplace").decode(),
            error=(MALFORMED_ROW, "videoid is not valid UTF-8"),
        )
    if not videoid:
        return Row(index, "", error=(MISSING_VIDEOID, f"empty {columns.videoid}"))
    caption = _text(fields[columns.caption])
    if caption is None:
        return Row(index, videoid, error=(MALFORMED_ROW, "caption is not valid UTF-8"))
    if not caption.strip():
        return Row(index, videoid, error=(EMPTY_CAPTION, f"empty {columns.caption}"))
    if len(caption) > MAX_CAPTION_CHARS:
        return Row(
            index,
            videoid,
            error=(LONG_CAPTION, f"{columns.caption} of {len(caption):,} characters (at most {MAX_CAPTION_CHARS:,})"),
        )
    location, error = resolve_location(fields, columns, csv_dir, video_root, videoid)
    if error:  # before the key is claimed: a later good row of this video must not be refused as a duplicate
        return Row(index, videoid, error=error)
    return Row(
        index,
        videoid,
        key=sample_key(videoid),
        caption=caption,
        location=location,
        csv_duration=parse_iso_duration(fields.get(columns.duration, "")),
    )
