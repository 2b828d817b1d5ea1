"""Reading WebVid-style CSVs: columns, bad rows, locations, streaming memory, duplicate detection."""

from __future__ import annotations

import random
import tracemalloc
from pathlib import Path

import pytest
from conftest import REPO, write_csv

from pipeline.source import (
    MAX_CAPTION_CHARS,
    Columns,
    CsvError,
    SeenKeys,
    count_rows,
    iter_rows,
    parse_iso_duration,
    read_header,
)


def test_real_webvid_csv_parses():
    path = REPO / "tests" / "data" / "annotations" / "webvid" / "test_webvid.csv"
    rows = list(iter_rows(path))
    assert len(rows) == count_rows(path) == 20
    assert all(r.error is None for r in rows)
    assert all(r.location.startswith("https://") for r in rows)
    assert any("," in r.caption for r in rows)  # quoted captions with commas survive
    assert all(r.csv_duration and r.csv_duration > 0 for r in rows)


def test_columns_in_any_order_and_renamed(tmp_path):
    path = write_csv(tmp_path / "a.csv", [["a.mp4", "cap", "7"]], header=["url", "text", "id"])
    with pytest.raises(CsvError, match="videoid"):
        read_header(path, Columns())
    rows = list(iter_rows(path, Columns(videoid="id", caption="text", url="url")))
    assert (rows[0].videoid, rows[0].caption, rows[0].location) == ("7", "cap", str(tmp_path / "a.mp4"))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "not found"),
        ("", "empty"),
        ("videoid,name,page_dir\n1,x,d\n", "contentUrl"),
        ("id,name,contentUrl\n1,x,y\n", "videoid"),
        ("videoid,contentUrl\n1,y\n", "'name'"),
        # the caption came from the last column of the name, in silence
        ("videoid,name,contentUrl,name\n1,a,y,b\n", r"names column\(s\) \['name'\] more than once; rename all but one"),
    ],
)
def test_bad_csv_is_refused_with_the_reason(tmp_path, content, message):
    path = tmp_path / "w.csv"
    if content is not None:
        path.write_text(content)
    with pytest.raises(CsvError, match=message):
        read_header(path, Columns())


def test_directory_and_binary_files_are_refused(tmp_path):
    with pytest.raises(CsvError, match="not a file"):
        read_header(tmp_path, Columns())
    path = tmp_path / "bin.csv"
    path.write_bytes(b"\xff\xfe\x00\x81garbage")
    with pytest.raises(CsvError, match="cannot read"):
        read_header(path, Columns())


def test_video_root_needs_no_url_column(tmp_path):
    path = write_csv(tmp_path / "a.csv", [["5", "cap", "001_002"]], header=["videoid", "name", "page_dir"])
    rows = list(iter_rows(path, Columns(), video_root=tmp_path / "root"))
    assert rows[0].location == str((tmp_path / "root" / "001_002" / "5.mp4").resolve())


def test_an_unclosed_quote_that_pairs_with_a_later_one_fails_its_own_row_only(tmp_path):
    """The quote left open in row 1 closed at row 4's quoted caption, and the record came out the header's width:
    row 1 was taken as valid, with rows 1 to 4 as its caption and row 4's video, and rows 2 to 4 vanished."""
    path = tmp_path / "w.csv"
    path.write_bytes(
        b"videoid,name,page_idx,page_dir,duration,contentUrl\n"
        b'1,"Aerial view of a city,0,d,PT1S,v/1.mp4\n'
        b"2,caption 2,0,d,PT1S,v/2.mp4\n"
        b"3,caption 3,0,d,PT1S,v/3.mp4\n"
        b'4,"Man says ""hello"" to camera",0,d,PT1S,v/4.mp4\n'
        b"5,caption 5,0,d,PT1S,v/5.mp4\n"
    )
    rows = list(iter_rows(path))
    assert rows[0].error[0] == "malformed_row" and "lines 2-5" in rows[0].error[1]
    assert [(r.videoid, r.location.rsplit("/", 1)[-1]) for r in rows[1:]] == [(f"{i}", f"{i}.mp4") for i in range(2, 6)]
    assert rows[3].caption == 'Man says "hello" to camera'


def test_a_quote_open_for_more_than_max_record_lines_is_cut_there(tmp_path):
    """A quote open to the end of a WebVid-size CSV held the rest of the file in memory (twice); a record stops at
    MAX_RECORD_LINES, and the lines after its first are read again."""
    from pipeline import source

    good = b"".join(b"%d,caption %d,0,d,PT1S,v/%d.mp4\n" % (i, i, i) for i in range(2, 2 + 3 * source.MAX_RECORD_LINES))
    path = tmp_path / "w.csv"
    path.write_bytes(b"videoid,name,page_idx,page_dir,duration,contentUrl\n" + b'1,"open,0,d,PT1S,v/1.mp4\n' + good)
    rows = list(iter_rows(path))
    assert (
        rows[0].error[0] == "malformed_row" and f"still open after {source.MAX_RECORD_LINES} lines" in rows[0].error[1]
    )
    assert len(rows) == 1 + 3 * source.MAX_RECORD_LINES and not any(r.error for r in rows[1:])


def test_file_urls_are_decoded_as_urls(tmp_path):
    """file:// URLs were taken as text: %20 kept, localhost and a relative file: path made part of the path."""
    rows = [
        ["0", "cap", 0, "d", "PT1S", "file:///data/sp%20ace/0.mp4"],
        ["1", "cap", 0, "d", "PT1S", "file://localhost/data/1.mp4"],
        ["2", "cap", 0, "d", "PT1S", "file:v/2.mp4"],
        ["3", "cap", 0, "d", "PT1S", "FILE:///data/3.mp4"],
        ["4", "cap", 0, "d", "PT1S", "file://nas.example/data/4.mp4"],
    ]
    got = list(iter_rows(write_csv(tmp_path / "a.csv", rows)))
    assert [r.location for r in got[:4]] == [
        "/data/sp ace/0.mp4",
        "/data/1.mp4",
        str(tmp_path / "v/2.mp4"),
        "/data/3.mp4",
    ]
    assert got[4].error[0] == "unsupported_url" and "nas.example" in got[4].error[1]


def test_a_column_named_on_the_command_line_must_be_there(tmp_path):
    """--page_dir_col or --duration_col naming a column the CSV lacks was silent: every video a missing_file (under
    --video_root), or every csv_duration null. The defaults may be absent: a flat --video_root, no durations."""
    path = write_csv(
        tmp_path / "a.csv", [["5", "cap", "d", "PT1S"]], header=["videoid", "name", "page_dir", "duration"]
    )
    for columns, flag in [
        (Columns(page_dir="pagedir"), "--page_dir_col"),
        (Columns(duration="length"), "--duration_col"),
    ]:
        with pytest.raises(CsvError, match=f"missing column.*{flag} NAME"):
            read_header(path, columns, video_root=tmp_path)
    with pytest.raises(CsvError, match="--duration_col NAME"):
        read_header(path, Columns(url="path", duration="length"), video_root=tmp_path)
    flat = write_csv(tmp_path / "flat.csv", [["5", "cap"]], header=["videoid", "name"])
    assert read_header(flat, Columns(), video_root=tmp_path) == ["videoid", "name"]
    urls = write_csv(tmp_path / "urls.csv", [["5", "cap", "v.mp4"]], header=["videoid", "name", "contentUrl"])
    assert read_header(urls, Columns(page_dir="pagedir")) == ["videoid", "name", "contentUrl"]  # no --video_root


def test_video_root_paths_use_the_stripped_videoid(tmp_path):
    path = write_csv(tmp_path / "a.csv", [[" 5 ", "cap", "001_002"]], header=["videoid", "name", "page_dir"])
    row = next(iter_rows(path, Columns(), video_root=tmp_path / "root"))
    assert (row.videoid, row.location) == ("5", str((tmp_path / "root" / "001_002" / "5.mp4").resolve()))


def test_a_row_without_a_location_does_not_claim_its_videoid(tmp_path):
    """A later good row of the same video is sharded, not refused as a duplicate of a row that was never used."""
    path = write_csv(tmp_path / "a.csv", [["7", "cap", 0, "d", "PT1S", ""], ["7", "cap", 0, "d", "PT1S", "v/7.mp4"]])
    rows = list(iter_rows(path))
    assert [r.error[0] if r.error else None for r in rows] == ["missing_location", None]


def test_bad_rows_are_classified_and_keep_their_slot(tmp_path):
    path = tmp_path / "w.csv"
    path.write_bytes(
        b"videoid,name,page_idx,page_dir,duration,contentUrl\n"
        b"1,ok,0,d,PT00H00M17S,v/1.mp4\n"
        b"\n"  # blank line
        b"2,too,few\n"
        b",no id,0,d,PT1S,v/x.mp4\n"
        b"3,   ,0,d,PT1S,v/3.mp4\n"
        b"1,again,0,d,PT1S,v/1.mp4\n"
        b'4,"multi\nline, ""quoted""",0,d,PT1S,v/4.mp4\n'
        b"5,bad \xff byte,0,d,PT1S,v/5.mp4\n"
        b"6,no url,0,d,PT1S,\n"
        b"7,s3,0,d,PT1S,s3://bucket/7.mp4\n"
        b"8,abs,0,d,PT1S,/data/8.mp4\n"
        b"9,web,0,d,PT1S,https://example.invalid/9.mp4\n"
        b"10,file url,0,d,PT1S,file:///data/10.mp4\n"
    )
    rows = list(iter_rows(path))
    assert [r.index for r in rows] == list(range(13))
    reasons = [r.error[0] if r.error else None for r in rows]
    assert reasons == [
        None,
        "empty_row",
        "malformed_row",
        "missing_videoid",
        "empty_caption",
        "duplicate_videoid",
        None,
        "malformed_row",
        "missing_location",
        "unsupported_url",
        None,
        None,
        None,
    ]
    assert rows[0].location == str(tmp_path / "v" / "1.mp4")
    assert rows[0].csv_duration == 17.0
    assert rows[6].caption == 'multi\nline, "quoted"'
    assert rows[10].location == "/data/8.mp4"
    assert rows[11].location == "https://example.invalid/9.mp4"
    assert rows[12].location == "/data/10.mp4"


def test_an_unclosed_quote_fails_its_own_row_only(tmp_path):
    """A field whose quote never closes ran on into the rows after it, which vanished into one malformed row (on a
    2.5M-row CSV, the rest of the file as one field). The record is failed with its lines named, and the lines
    after its first are read again as rows of their own. A quoted caption over two lines is still one row."""
    path = tmp_path / "w.csv"
    path.write_bytes(
        b"videoid,name,page_idx,page_dir,duration,contentUrl\n"
        b"0,ok,0,d,PT1S,v/0.mp4\n"
        b'1,"broken caption,0,d,PT1S,v/1.mp4\n'
        + b"".join(b"%d,caption %d,0,d,PT1S,v/%d.mp4\n" % (i, i, i) for i in range(2, 6))
        + b'6,"two\nlines",0,d,PT1S,v/6.mp4\n'
        b"7,last,0,d,PT1S,v/7.mp4\n"
    )
    rows = list(iter_rows(path))
    assert [r.index for r in rows] == list(range(8)) and count_rows(path) == 8
    assert [r.videoid for r in rows if not r.error] == ["0", "2", "3", "4", "5", "6", "7"]
    assert rows[6].caption == "two\nlines"
    reason, detail = rows[1].error
    assert reason == "malformed_row"
    assert "lines 3-" in detail and "unclosed quote" in detail


@pytest.mark.parametrize("page_dir", ["../escape", "/etc", "a/../../b", ".."])
def test_video_root_cannot_be_escaped(tmp_path, page_dir):
    path = write_csv(tmp_path / "a.csv", [["5", "cap", 0, page_dir, "PT1S", ""]])
    row = next(iter_rows(path, video_root=tmp_path))
    assert row.error[0] == "unsafe_path"


def test_videoid_with_slashes_cannot_leave_video_root(tmp_path):
    path = write_csv(tmp_path / "a.csv", [["../../x", "cap", 0, "d", "PT1S", ""]])
    row = next(iter_rows(path, video_root=tmp_path))
    assert row.error[0] == "unsafe_path"


def test_crafted_ids_get_distinct_safe_keys(tmp_path):
    ids = ["a.b", "a/b", "a_b", "../x", "/etc/passwd", "x y", "ünï", "a.b.c"]
    path = write_csv(tmp_path / "a.csv", [[i, "cap", 0, "d", "PT1S", "v.mp4"] for i in ids])
    keys = [r.key for r in iter_rows(path)]
    assert len(set(keys)) == len(ids)
    assert all("." not in k and "/" not in k and k for k in keys)
    assert keys[2] == "a_b"  # safe ids are kept as they are


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("PT00H00M17S", 17),
        ("PT1H2M3S", 3723),
        ("PT5.5S", 5.5),
        ("PT00H01M00S", 60),
        ("P1DT00H00M17S", 86417),
        ("P1D", 86400),
        ("17", None),
        ("", None),
        ("P", None),
        ("PT", None),
    ],
)
def test_parse_iso_duration(text, seconds):
    assert parse_iso_duration(text) == seconds


def test_seen_keys_matches_a_set():
    rng = random.Random(1)
    seen, reference = SeenKeys(), set()
    for _ in range(300):
        batch = [str(rng.randrange(150_000)) for _ in range(rng.choice([1, 7, 1000, 4096]))]
        expected = []
        for key in batch:  # one at a time, in order: a key repeated within the batch is new once
            expected.append(key not in reference)
            reference.add(key)
        assert seen.add_many(batch) == expected
    assert seen.add_many([]) == []


def test_memory_stays_flat_as_the_csv_grows(tmp_path):
    """Streaming: peak Python memory for 120k rows is close to that for 30k rows (only 8 bytes/row kept)."""

    def peak(rows: int) -> int:
        path = tmp_path / f"big{rows}.csv"
        with open(path, "w") as f:
            f.write("videoid,name,page_idx,page_dir,duration,contentUrl\n")
            for i in range(rows):
                f.write(
                    f'{i},"caption number {i}, with a comma and some words to make the row longer",1,d,PT10S,'
                    f"https://host.invalid/videos/{i}.mp4\n"
                )
        tracemalloc.start()
        count = sum(1 for _ in iter_rows(path))
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert count == rows
        return top

    small, big = peak(30_000), peak(120_000)
    file_size = Path(tmp_path / "big120000.csv").stat().st_size
    assert big < file_size / 8, (big, file_size)
    assert big - small < 3 * 8 * 90_000 + 500_000, (small, big)  # ~8 bytes per extra row, not ~130


def test_a_caption_longer_than_any_caption_is_a_failed_row(tmp_path):
    """A megabyte "caption" (a scraped page, a broken field) was stored and tokenized at every draw, 4 s per MB."""
    path = tmp_path / "webvid.csv"
    longest = "a" * MAX_CAPTION_CHARS
    path.write_text(
        "videoid,name,page_idx,page_dir,duration,contentUrl\n"
        f"1,{longest},0,d,PT1S,/v/1.mp4\n"
        f"2,{longest}b,0,d,PT1S,/v/2.mp4\n"
    )
    rows = list(iter_rows(path))
    assert rows[0].error is None and rows[0].caption == longest
    assert rows[1].error == ("long_caption", "name of 10,001 characters (at most 10,000)")
