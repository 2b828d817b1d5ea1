"""eval.report: result records round trip, the paper's tables from synthetic records, the alpha-sweep plot."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from eval import report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def record(model: str, dataset: str, metrics: dict, expected: int = 10, found: int | None = None) -> dict:
    found = expected if found is None else found
    return {
        "dataset": dataset,
        "model": model,
        "weights": f"runs/{model}.pt",
        "metrics": metrics,
        "num_expected": expected,
        "num_found": found,
        "num_missing": expected - found,
        "missing": [f"v{i}" for i in range(expected - found)],
        "config": {"frames": 4},
        "code_version": "abc1234",
    }


def skipped(model: str, dataset: str) -> dict:
    return {
        "dataset": dataset,
        "model": model,
        "skipped": True,
        "reason": "annotation file not found",
        "path": f"data/{dataset}/annotations.csv",
    }


RESULTS = [
    record("ours-fitclip", "ucf101", {"top1": 73.25, "top5": 95.3, "mean_per_class": 72.0, "num": 3700}, 3783, 3700),
    record("ours-fitclip", "msrvtt", {"R@1": 33.84, "R@5": 59.8, "R@10": 69.4, "MdR": 3.0, "MnR": 21.3}, 1000),
    record("ours-clip", "msrvtt", {"R@1": 30.4, "R@5": 55.12, "R@10": 64.06, "MdR": 4.0, "MnR": 25.0}, 1000),
    skipped("ours-fitclip", "moments"),
    skipped("ours-clip", "moments"),
    record("ours-clip", "toy_videos", {"top1": 50.0, "top5": 100.0, "num": 4}, 4),
]


def section(markdown: str, title_start: str) -> str:
    """The text of the section whose heading starts with ``title_start``, up to the next heading."""
    match = re.search(rf"^## {re.escape(title_start)}.*?(?=^## |\Z)", markdown, flags=re.M | re.S)
    assert match, f"no section {title_start!r} in\n{markdown}"
    return match.group(0)


def rows(section_text: str) -> dict[str, list[str]]:
    """Table rows by their first cell (the model), header and separator left out."""
    out = {}
    for line in section_text.splitlines():
        if line.startswith("| ") and not line.startswith("| Model"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            out[cells[0]] = cells[1:]
    return out


# ----- records


def test_write_load_round_trip(tmp_path):
    paths = [report.write_result(tmp_path, r["model"], r["dataset"], r) for r in RESULTS]
    assert paths[0] == tmp_path / "ours-fitclip" / "ucf101.json"
    assert all(p.is_file() for p in paths)
    assert not list(tmp_path.rglob(".*"))  # no temporaries left behind
    (tmp_path / "ours-clip" / "notes.json").write_text('{"hello": 1}')  # not a result record
    (tmp_path / "ours-clip" / "broken.json").write_text("{not json")
    (tmp_path / "summary.json").write_text("{}")  # not under a model folder
    with pytest.warns(UserWarning, match="broken.json"):
        loaded = report.load_results(tmp_path)
    key = lambda r: (r["model"], r["dataset"])  # noqa: E731
    assert sorted(loaded, key=key) == sorted(RESULTS, key=key)


def test_write_result_overwrites_atomically(tmp_path):
    first = record("m", "ucf101", {"top1": 1.0})
    second = record("m", "ucf101", {"top1": 2.0})
    report.write_result(tmp_path, "m", "ucf101", first)
    path = report.write_result(tmp_path, "m", "ucf101", second)
    assert json.loads(path.read_text())["metrics"] == {"top1": 2.0}
    assert [p.name for p in path.parent.iterdir()] == ["ucf101.json"]


def test_write_result_rejects_incomplete_records_and_bad_names(tmp_path):
    incomplete = record("m", "ucf101", {"top1": 1.0})
    del incomplete["code_version"]
    with pytest.raises(ValueError, match="code_version"):
        report.write_result(tmp_path, "m", "ucf101", incomplete)
    with pytest.raises(ValueError, match="slash"):
        report.write_result(tmp_path, "../m", "ucf101", record("m", "ucf101", {}))
    with pytest.raises(ValueError, match="reason"):
        report.write_result(tmp_path, "m", "moments", {"dataset": "moments", "model": "m", "skipped": True})
    report.write_result(tmp_path, "m", "moments", skipped("m", "moments"))  # a skipped record needs no metrics


def test_code_version_is_a_non_empty_string():
    version = report.code_version()
    assert isinstance(version, str) and version and "\n" not in version


# ----- summary


def test_summary_tables_rows_and_cells():
    md = report.summary_markdown(RESULTS)
    titles = [line[3:] for line in md.splitlines() if line.startswith("## Table")]
    # a table per benchmark that some model was evaluated on (Moments was skipped, YouCook2/DiDeMo not run)
    assert [t.split(":")[0] for t in titles] == ["Table 1a", "Table 2a", "Table 3"]
    assert "Table 1a: UCF101 (top-1 / top-5 accuracy, %)" in md
    assert "Table 2a: MSR-VTT 1k-A text-to-video (R@1 / R@5 / R@10, MdR)" in md
    assert "Table 1b" not in md and "Table 2b" not in md and "Table 2c" not in md
    assert "Table 3: overview" in md

    ucf = rows(section(md, "Table 1a"))
    # our models first, in order of first appearance, then the paper's rows
    assert list(ucf) == [
        "ours-fitclip",
        "ours-clip",
        "*CLIP (teacher) (paper)*",
        "*Student (paper)*",
        "*FitCLIP (paper)*",
    ]
    assert ucf["ours-fitclip"] == ["73.3 [1]", "95.3"]  # one decimal, half up; footnote marker on the row
    assert ucf["ours-clip"] == ["–", "–"]
    assert ucf["*CLIP (teacher) (paper)*"] == ["*74.5*", "*94.3*"]
    assert ucf["*Student (paper)*"] == ["*64.7*", "–"]
    assert ucf["*FitCLIP (paper)*"] == ["*73.3*", "*95.3*"]
    assert "[1] ours-fitclip, UCF101: 3700 of 3783 videos found (83 missing)." in section(md, "Table 1a")

    msrvtt = rows(section(md, "Table 2a"))
    assert msrvtt["ours-fitclip"] == ["33.8", "59.8", "69.4", "3"]  # MdR as a number
    assert msrvtt["ours-clip"] == ["30.4", "55.1", "64.1", "4"]
    assert msrvtt["*CLIP (teacher) (paper)*"] == ["*30.4*", "*55.1*", "*64.1*", "*4*"]
    assert msrvtt["*Student (paper)*"] == ["–", "*52.6*", "–", "–"]
    assert "videos found" not in section(md, "Table 2a")

    overview_text = section(md, "Table 3")
    assert "| Model | UCF101 top-1 | MiT top-1 | MSR-VTT R@5 | YouCook2 R@5 | DiDeMo R@5 |" in overview_text
    overview = rows(overview_text)
    assert overview["ours-fitclip"] == ["73.3 [1]", "–", "59.8", "–", "–"]
    assert overview["ours-clip"] == ["–", "–", "55.1", "–", "–"]
    assert overview["*CLIP (teacher) (paper)*"] == ["*74.5*", "*19.9*", "*55.1*", "*14.6*", "*49.9*"]
    assert overview["*Student (paper)*"] == ["*64.7*", "*17.7*", "*52.6*", "*9.7*", "*42.4*"]
    assert overview["*FitCLIP (paper)*"] == ["*73.3*", "*21.8*", "*59.8*", "*15.5*", "*53.7*"]
    assert "3700 of 3783 videos found" in overview_text

    others = rows(section(md, "Other datasets"))
    assert others["ours-clip"][0] == "toy_videos"
    assert "top1 50.0" in others["ours-clip"][1] and "num 4" in others["ours-clip"][1]

    skipped_text = section(md, "Skipped datasets")
    assert "- moments (ours-fitclip, ours-clip): annotation file not found (`data/moments/annotations.csv`)" in (
        skipped_text
    )


def test_summary_without_paper_rows():
    md = report.summary_markdown(RESULTS, include_paper=False)
    assert "(paper)" not in md
    assert list(rows(section(md, "Table 1a"))) == ["ours-fitclip", "ours-clip"]


def test_the_summary_says_where_the_protocol_differs_from_the_one_behind_the_paper_rows():
    """The paper's rows come from the authors' code: video embeddings not re-normalised, DiDeMo's val split."""
    ours = {"renormalize_video": True, "didemo_split": "test"}
    theirs = {"renormalize_video": False, "didemo_split": "val"}
    results = [record("m", "msrvtt", {"R@1": 1.0}), record("m", "didemo", {"R@1": 1.0})]

    def summary(config: dict) -> str:
        for rec in results:
            rec["config"] = {"frames": 4, **config}
        return report.summary_markdown(results)

    md = summary(ours)
    assert "Protocol, where it differs from the authors' code" in md
    assert "`--renormalize_video False`" in md and "`--didemo_split val`" in md
    assert "Protocol" not in summary(theirs)
    summary({**theirs, "didemo_split": "test"})
    assert "didemo_split val" in report.summary_markdown(results)
    assert "didemo_split" not in report.summary_markdown(results[:1])  # DiDeMo not scored
    summary(ours)
    assert "Protocol" not in report.summary_markdown(results, include_paper=False)  # no paper rows to compare with

    # bf16 autocast, what --precision auto chose on a GPU (a record says what ran); the authors ran fp32
    summary(theirs)
    results[0]["precision"] = "bf16"
    assert "bf16 autocast" in report.summary_markdown(results) and "`--precision fp32`" in report.summary_markdown(
        results
    )
    results[0]["precision"] = "fp32"
    assert "Protocol" not in report.summary_markdown(results)

    # another frame count or model than the paper's rows (a record's config says which)
    summary(theirs)
    for rec in results:
        rec["config"].update(frames=1, model="tiny-clip.json")
    md = report.summary_markdown(results)
    assert "1 frame(s) per video; the paper's rows use 4 (`--frames 4`)" in md
    assert "model tiny-clip.json; the paper's rows are ViT-B/16 (`--model ViT-B-16-quickgelu`)" in md
    summary({**theirs, "model": "ViT-B-16-quickgelu"})
    assert "Protocol" not in report.summary_markdown(results)

    # YouCook2 from the official json when MIL-NCE's csv is absent: another clip set than the paper's
    youcook = [record("m", "youcook2", {"R@1": 1.0}), record("m", "youcook2", {"R@1": 1.0})]
    youcook[0].update(config=theirs, sources=["/d/youcook2/validation_youcook.csv"], num_expected=3350)
    assert "Protocol" not in report.summary_markdown(youcook[:1])
    youcook[1].update(config=theirs, sources=["/d/youcook2/youcookii_annotations_trainval.json"], num_expected=3492)
    assert "official json (3492 clips); the authors' code used MIL-NCE's `validation_youcook.csv`" in (
        report.summary_markdown(youcook[1:])
    )


def test_model_order_follows_first_appearance():
    results = [record("zeta", "didemo", {"R@5": 40.0}), record("alpha", "ucf101", {"top1": 1.0})]
    overview = rows(section(report.summary_markdown(results, include_paper=False), "Table 3"))
    assert list(overview) == ["zeta", "alpha"]
    assert overview["zeta"] == ["–", "–", "–", "–", "40.0"]


def test_dataset_name_aliases():
    assert report.benchmark_of("MSR-VTT").key == "msrvtt"
    assert report.benchmark_of("msrvtt_1ka").key == "msrvtt"
    assert report.benchmark_of("moments_in_time").key == "moments"
    assert report.benchmark_of("YouCook2").key == "youcook2"
    assert report.benchmark_of("toy") is None
    assert report.headline_metric("ucf101") == "top1"
    assert report.headline_metric("didemo") == "R@5"


def test_format_value():
    assert report.format_value(None) == "–"
    assert report.format_value(73.25) == "73.3"
    assert report.format_value(0.05) == "0.1"
    assert report.format_value(100) == "100.0"
    assert report.format_value(4.0, "MdR") == "4"
    assert report.format_value(4.5, "MdR") == "4.5"


def test_write_summary(tmp_path):
    for r in RESULTS:
        report.write_result(tmp_path, r["model"], r["dataset"], r)
    path = report.write_summary(tmp_path, report.load_results(tmp_path))
    assert path == tmp_path / "summary.md"
    text = path.read_text(encoding="utf-8")
    assert "Table 3: overview" in text and "3700 of 3783 videos found" in text
    assert report.load_results(tmp_path)  # the summary does not disturb loading


# ----- plot


def test_plot_alpha_sweep_writes_png(tmp_path):
    alphas = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    points = [
        {"alpha": a, "dataset": d, "metric": m, "value": v0 + 10 * a - 12 * (a - 0.4) ** 2}
        for d, m, v0 in [("ucf101", "top1", 70.0), ("msrvtt", "R@5", 55.0), ("didemo", "R@5", 48.0)]
        for a in reversed(alphas)  # unsorted on purpose
    ]
    out = tmp_path / "plots" / "alpha_sweep.png"
    assert report.plot_alpha_sweep(points, out) == out
    data = out.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 10_000
    assert not [p for p in out.parent.iterdir() if p != out]  # no temporaries


def test_plot_alpha_sweep_single_point_without_paper_alpha(tmp_path):
    out = report.plot_alpha_sweep([{"alpha": 1.0, "dataset": "x", "metric": "top1", "value": 3.0}], tmp_path / "p.png")
    assert out.read_bytes().startswith(PNG_SIGNATURE)


def test_plot_alpha_sweep_rejects_no_points(tmp_path):
    with pytest.raises(ValueError, match="no points"):
        report.plot_alpha_sweep([], tmp_path / "p.png")


def test_import_does_not_load_matplotlib():
    code = "import sys, eval.report; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=report.REPO)
    assert out.stdout.strip() == "False"


def test_a_model_name_that_ends_like_a_footnote_or_holds_a_bar_keeps_the_tables_whole():
    """``--names "baseline [7]"`` ended the summary in KeyError: 7 (the name's cell was read as a footnote mark), and
    every later run into that OUT with it; ``--names "A|B"`` split its row into one more column."""
    results = [record("baseline [7]", "msrvtt", {"R@1": 1.0}), record("A|B", "ucf101", {"top1": 2.0}, found=9)]
    md = report.summary_markdown(results, include_paper=False)
    overview = section(md, "Table 3")
    assert "| baseline [7] |" in overview and "| A\\|B |" in overview
    assert "[1] A|B, UCF101: 9 of 10 videos found (1 missing)." in overview  # its own footnote, numbered 1
