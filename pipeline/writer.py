"""Writing shards: deterministic tar files, the stats sidecar that marks a shard complete, sample keys.

The format is specified in ``shards/README.md``. Every file is written under a
temporary name in the output folder and renamed into place, so a crash never
leaves a half-written file under a final name; a shard is complete once its
``_stats.json`` exists (written after its tar is renamed into place).
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

TAR_MTIME = 0  # fixed tar metadata: the same samples give byte-identical tars
_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_-]")
_MAX_KEY = 80
TMP_MARK = ".tmp-"
# A shard member is a frame (tens of KB at the default --size 256, a few MB at full 4K) or a caption. Bigger ones,
# and sparse ones (a header can declare terabytes that tarfile fills with zeros in memory), are not read: a tar
# that holds them is not one pipeline.shard wrote.
MAX_MEMBER_BYTES = 64 << 20
NAME_MAX = 255  # bytes in one file name, on Linux's filesystems
ABANDONED_AFTER_S = 10.0  # a temporary this young may be one whose writer has not yet locked it


def sample_key(videoid: str) -> str:
    """A webdataset key for ``videoid``: no dots or slashes, deterministic, unique per videoid.

    Ids of at most 80 characters made of ``[A-Za-z0-9_-]`` (all of WebVid's) are kept as they are. Any
    other id is sanitised, cut to 80 characters and suffixed with a hash of the original, so two ids
    that sanitise alike ("a.b", "a/b") still get different keys.
    """
    key = _UNSAFE_KEY_CHARS.sub("_", videoid)[:_MAX_KEY]
    if key != videoid:
        digest = hashlib.blake2b(videoid.encode("utf-8", "surrogateescape"), digest_size=6).hexdigest()
        key = f"{key}_{digest}"
    return key


def shard_name(shard: int) -> str:
    return f"{shard:06d}"


def tar_path(out_dir: str | Path, shard: int) -> Path:
    return Path(out_dir) / f"{shard_name(shard)}.tar"


def stats_path(out_dir: str | Path, shard: int) -> Path:
    return Path(out_dir) / f"{shard_name(shard)}_stats.json"


def temporary_name(path: str | Path) -> Path:
    """The name a new temporary of ``path`` gets: hidden, beside it, unique (``.NAME.tmp-<12 hex>``)."""
    path = Path(path)
    return path.with_name(f".{_temporary_stem(path.name)}{TMP_MARK}{uuid.uuid4().hex[:12]}")


def _temporary_stem(name: str) -> str:
    """``name``, or where ``.NAME.tmp-<12 hex>`` would be longer than a file name may be (255 bytes; the name itself
    may be up to that), its start and a hash of it: a 247-character --out failed at its temporary, after the work."""
    room = NAME_MAX - len(f".{TMP_MARK}") - 12
    raw = os.fsencode(name)
    if len(raw) <= room:
        return name
    return f"{os.fsdecode(raw[: room - 9])}~{hashlib.sha256(raw).hexdigest()[:8]}"


def hold_temporary(fd: int) -> None:
    """Mark an open temporary (a file's or a folder's descriptor) as in use until it is closed, so
    :func:`remove_abandoned` leaves it: a ``flock`` ends only with its descriptor, and so with a killed process."""
    with contextlib.suppress(OSError):  # no flock on this filesystem: remove_abandoned cannot lock it either
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


_held_folders: set[int] = set()  # descriptors of the temporary folders this process holds (held_temporary_folder)


def _let_go_in_child() -> None:
    # a forked child (a decode or loader worker) inherits the descriptor, and a flock lasts until its last copy is
    # closed: a worker orphaned by the kill of its run would keep that run's folder from counting as abandoned
    for fd in list(_held_folders):
        with contextlib.suppress(OSError):
            os.close(fd)
    _held_folders.clear()


os.register_at_fork(after_in_child=_let_go_in_child)


@contextlib.contextmanager
def held_temporary_folder(target: str | Path) -> Iterator[Path]:
    """A new temporary folder of ``target`` (``.NAME.tmp-<12 hex>`` beside it), held (:func:`hold_temporary`) while
    the block runs, by this process and not by the children it forks. What becomes of the folder is the caller's:
    renamed into place, or removed."""
    tmp = temporary_name(target)
    tmp.mkdir(parents=True)
    fd = os.open(tmp, os.O_RDONLY)
    _held_folders.add(fd)
    try:
        hold_temporary(fd)
        yield tmp
    finally:
        _held_folders.discard(fd)
        os.close(fd)


def remove_abandoned(path: str | Path) -> list[Path]:
    """Delete the temporaries of ``path`` (``.NAME.tmp-*`` beside it, files or folders) that a killed writer left.

    Every writer holds a ``flock`` on its temporary until it renames it (:func:`hold_temporary`), so one whose lock
    can be taken has no writer left. Left alone: a temporary whose lock is held, or cannot be taken at all (a
    filesystem without flock), and one younger than ``ABANDONED_AFTER_S`` (its writer may not have locked it yet).
    Needs no lock of the folder: for the outputs of one file or folder that two runs may write at once."""
    path = Path(path)
    removed = []
    for tmp in path.parent.glob(f".{glob.escape(_temporary_stem(path.name))}{TMP_MARK}*"):
        try:
            fd = os.open(tmp, os.O_RDONLY)
        except OSError:  # renamed into place meanwhile
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            abandoned = time.time() - os.fstat(fd).st_mtime > ABANDONED_AFTER_S
        except OSError:
            abandoned = False
        if abandoned:
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
            removed.append(tmp)
        os.close(fd)
    return removed


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[BinaryIO]:
    """A file to write ``path``'s bytes into: open at a new temporary name beside it (:func:`temporary_name`), held
    (:func:`hold_temporary`); when the block ends, fsynced and renamed over ``path``. A failure removes it, so a
    crash never leaves a torn file under the final name."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb") as f:
            hold_temporary(f.fileno())
            yield f
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the rename makes them the file
            os.replace(tmp, path)  # still open, so still locked: a cleaner beside it never takes it for abandoned
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to a temporary name beside ``path``, fsync, then rename over ``path`` (:func:`atomic_file`)."""
    with atomic_file(path) as f:
        f.write(data)


def json_bytes(obj) -> bytes:
    """Deterministic, readable JSON (sorted keys, UTF-8). A path of bytes that are not UTF-8 (os.fsdecode's
    surrogates, as in ``caf\\udce9.mp4``) is written as its JSON escape, which reads back as the same path."""
    return (json.dumps(obj, sort_keys=True, ensure_ascii=False, indent=1) + "\n").encode("utf-8", "backslashreplace")


def read_stats(out_dir: str | Path, shard: int) -> dict | None:
    """The stats of a complete shard, or None if the shard is not complete (or its stats are unreadable)."""
    path = stats_path(out_dir, shard)
    if not path.is_file() or not tar_path(out_dir, shard).is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


INDEX_NAME = "shards.json"
SHARD_TAR = re.compile(r"^(\d{6})\.tar$")  # a shard's tar, by name: its number in group 1


def write_index(out_dir: str | Path, shards: int, src: str | Path, finished: bool) -> None:
    """Record that ``out_dir``'s shards are 0..shards-1, made from ``src``, and whether the run making them has
    ended. Readers take no shard past them: a folder sharded again from a shorter CSV keeps the earlier run's shards
    past the new last one (deleting a user's files is not the pipeline's to do). Until the run ends, its shards may
    be missing or still an earlier CSV's, so readers refuse the folder (:func:`list_folder`)."""
    record = {"shards": shards, "src": str(Path(src).resolve()), "finished": finished}
    atomic_write_bytes(Path(out_dir) / INDEX_NAME, json_bytes(record))


def read_index(folder: str | Path) -> dict | None:
    """``folder``'s index (``shards``, ``src``, ``finished``), or None if it has none (a folder of pipeline.subset,
    or of a pipeline.shard from before the index). Raises ValueError, naming the fix, if it cannot be read."""
    path = Path(folder) / INDEX_NAME
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if type(record["shards"]) is not int or record["shards"] < 0 or not isinstance(record["src"], str):
            raise ValueError(f"shards {record['shards']!r}, src {record['src']!r}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(
            f"{path} cannot be read ({e}); rerun the pipeline.shard command that made {folder} to write it again"
        ) from None
    return {**record, "finished": record.get("finished") is not False}


@dataclass(frozen=True)
class ShardListing:
    """A shard folder as its readers (training, pipeline.subset) take it (:func:`list_folder`). A shard is complete
    when its tar and its stats are there and the stats can be read, as ``pipeline.shard`` decides what to remake."""

    folder: Path
    ok: dict[int, int]  # the complete shards the index lists (all, without an index), in order: their samples
    past: list[int]  # complete shards past the index, an earlier run's of a longer CSV: not read
    missing: list[int]  # shards the index lists that are not complete; or a tar with unreadable stats
    index: dict | None

    def warnings(self) -> list[str]:
        """A line for each kind of shard the readers leave out."""
        lines = []
        if self.past:
            lines.append(
                f"warning: {self.folder} holds {len(self.past)} shard(s) past the {self.index['shards']} its "
                f"{INDEX_NAME} lists (e.g. {tar_path(self.folder, self.past[0]).name}), left by an earlier "
                "pipeline.shard of another CSV; they are not read. Remove them to free their space"
            )
        if self.missing:
            fix = (
                "Rerunning the pipeline.shard command that made the folder makes them"
                if self.index
                else "Make the folder again (pipeline.subset: into a new --out)"
            )
            lines.append(
                f"warning: {len(self.missing)} shard(s) of {self.folder} are missing or have unreadable stats (e.g. "
                f"{tar_path(self.folder, self.missing[0]).name}); they are not read. {fix}"
            )
        return lines


_OK_CACHE: dict[tuple[str, int, int], int | None] = {}


def _stats_ok(folder: Path, shard: int, entry: os.DirEntry) -> int | None:
    """The ``ok`` count of a shard's stats file (``entry``), None if it cannot be read. Parsed once per file state
    (path, mtime, size): a training run lists each folder four times or so, and parsing the stats of 10,000 shards
    takes most of a second each time."""
    st = entry.stat()
    key = (entry.path, st.st_mtime_ns, st.st_size)
    if key not in _OK_CACHE:
        stats = read_stats(folder, shard)
        _OK_CACHE[key] = stats["ok"] if isinstance(stats, dict) and type(stats.get("ok")) is int else None
    return _OK_CACHE[key]


def list_folder(folder: str | Path) -> ShardListing:
    """What ``folder`` holds for its readers. Raises ValueError, naming the fix, if its index cannot be read or
    says that the pipeline.shard making the folder has not ended: its shards may be missing, or an earlier CSV's."""
    folder = Path(folder)
    index = read_index(folder)
    if index is not None and not index["finished"]:
        raise ValueError(
            f"the pipeline.shard run making {folder} has not finished (it was stopped, or is still running): its "
            f"shards may be missing, or an earlier CSV's. Finish it by running it again: python -m pipeline.shard "
            f"--src {index['src']} --out {folder} (with the same flags)"
        )
    names = {entry.name: entry for entry in os.scandir(folder)}
    ok, damaged = {}, []
    for n in sorted(int(m.group(1)) for m in map(SHARD_TAR.match, names) if m):
        stats = names.get(stats_path(folder, n).name)
        if stats is None:
            continue  # being made, or its worker died: the next run makes it
        count = _stats_ok(folder, n, stats)
        if count is None:
            damaged.append(n)
        else:
            ok[n] = count
    if index is None:
        return ShardListing(folder, ok, [], damaged, None)
    limit = index["shards"]
    missing = sorted({n for n in range(limit) if n not in ok} | {n for n in damaged if n < limit})
    past = [n for n in ok if n >= limit]
    return ShardListing(folder, {n: c for n, c in ok.items() if n < limit}, past, missing, index)


def remove_temporaries(out_dir: str | Path) -> list[Path]:
    """Delete temporary files left by an interrupted run (call only while holding the folder's lock). A temporary
    folder is another tool's (``pipeline.subset --out OUT/labeled``, killed), which removes its own when it is done
    with it (:func:`remove_abandoned`)."""
    removed = []
    for path in Path(out_dir).glob(f".*{TMP_MARK}*"):
        if path.is_dir():
            continue
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


class TarShardWriter:
    """Writes one shard's tar to a temporary name; :meth:`commit` renames it into place.

    Members have fixed metadata (mtime 0, uid/gid 0, mode 0644, PAX format) and
    keep the order of :meth:`add_sample` calls, so identical samples give
    byte-identical tars.
    """

    def __init__(self, out_dir: str | Path, shard: int):
        self.final = tar_path(out_dir, shard)
        self.tmp = temporary_name(self.final)
        self._file = open(self.tmp, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT)
        self.samples = 0

    def add_sample(self, key: str, members: list[tuple[str, bytes]]) -> None:
        """Add ``{key}.{ext}`` for each ``(ext, data)``, in the given order."""
        if not key or "." in key or "/" in key:
            raise ValueError(f"invalid sample key {key!r}: no dots or slashes allowed")
        for ext, data in members:
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mtime = TAR_MTIME
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        self.samples += 1

    def commit(self) -> Path:
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.tmp, self.final)
        return self.final

    def abort(self) -> None:
        """Drop the temporary, also after a write failed (a full disk, a file-size limit), when closing the tar or
        the file would raise that error again while flushing."""
        try:
            for close in (self._tar.close, self._file.close):
                with contextlib.suppress(OSError, ValueError):
                    close()
        finally:
            self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> TarShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


class NotAShardError(tarfile.ReadError):
    """A tar member that pipeline.shard never writes; readers take it as damage to the tar (``tarfile.TarError``)."""


def _not_a_shard_member(info: tarfile.TarInfo, key: str, ext: str, twice: bool) -> str | None:
    """What makes ``info`` a member pipeline.shard never writes, or None."""
    if info.issparse():
        return "a sparse file"
    if not key:
        return "a file without a sample key"
    if "/" in info.name:  # samples of two folders would be read as one, by their file names
        return "in a folder"
    if twice:
        return f"a second .{ext} of its sample"
    return "too big" if info.size > MAX_MEMBER_BYTES else None


def tar_groups(tar: tarfile.TarFile) -> Iterator[tuple[str, list[tuple[str, tarfile.TarInfo]]]]:
    """``(key, [(ext, member), ...])`` for each sample of an open shard tar, in file order, as its headers are read:
    a sample's files are the consecutive files of one key (the part of the name before its first dot).

    A sparse member, one over ``MAX_MEMBER_BYTES``, a file without a key (``.0.jpg``), in a folder, or a second
    of its sample's extension raises :class:`NotAShardError`, before any of its data is read, once the samples before
    its own are given. Open the tar with :func:`open_tar`, which refuses oversized headers as well."""
    key, members = None, []
    for info in tar:
        if not info.isfile():
            continue
        k, _, ext = os.path.basename(info.name).partition(".")
        what = _not_a_shard_member(info, k, ext, twice=k == key and any(ext == e for e, _ in members))
        if what:
            if members and k != key:  # the samples before it are whole
                yield key, members
            raise NotAShardError(
                f"member {info.name!r} is {what} ({info.size:,} bytes): not a tar pipeline.shard wrote"
            )
        if k != key and members:
            yield key, members
            members = []
        key = k
        members.append((ext, info))
    if members:
        yield key, members


class _CappedReads:
    """A file whose reads ask for at most a member's largest size and a block: tarfile reads a long name's or a PAX
    header's payload in one read of the size its header declares (a 2 KB tar can declare a terabyte), before
    :func:`tar_groups` sees a member."""

    def __init__(self, file: BinaryIO):
        self._file = file

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0 or size > MAX_MEMBER_BYTES + tarfile.BLOCKSIZE:
            raise NotAShardError(f"a header or member of {size:,} bytes: not a tar pipeline.shard wrote")
        return self._file.read(size)

    def __getattr__(self, name: str):
        return getattr(self._file, name)


@contextlib.contextmanager
def open_tar(path: str | Path) -> Iterator[tarfile.TarFile]:
    """A shard tar opened to read, no read of it larger than a member may be (:class:`_CappedReads`)."""
    with open(path, "rb") as file, tarfile.open(fileobj=_CappedReads(file), mode="r:") as tar:
        yield tar


def iter_tar_samples(path: str | Path, keys: set[str] | None = None) -> Iterator[tuple[str, list[tuple[str, bytes]]]]:
    """Yield ``(key, [(ext, data), ...])`` from a shard tar, in file order; with ``keys``, of those samples only (the
    others' data is not read)."""
    with open_tar(path) as tar:
        for key, members in tar_groups(tar):
            if keys is None or key in keys:
                yield key, [(ext, tar.extractfile(info).read()) for ext, info in members]
