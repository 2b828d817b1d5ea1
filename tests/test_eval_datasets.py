"""Benchmark parsers: official counts on the real annotation files, tiny generated layouts, missing files."""

from __future__ import annotations

import csv
import json
import re
import shutil
import time
from pathlib import Path

import pytest

from eval import prompts
from eval.datasets import (
    CLASSIFICATION,
    DATASETS,
    RETRIEVAL,
    AnnotationsMissing,
    didemo,
    fixtures,
    moments,
    msrvtt,
    ucf101,
    youcook2,
)

REAL = Path(__file__).resolve().parent / "data" / "annotations"  # public files, in the repository (README there)


def real(rel: str) -> Path:
    path = REAL / rel
    assert path.is_file(), f"real annotation file {path} missing from the checkout"
    return path


def copy_into(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return dst


def assert_unique_ids(dataset) -> None:
    ids = [item.id for item in dataset.items]
    assert len(set(ids)) == len(ids)


# ---------------------------------------------------------------- prompts


def test_ucf101_templates_are_clips_48_in_order():
    t = prompts.UCF101_TEMPLATES
    assert len(t) == 48 and len(set(t)) == 48
    assert prompts.TEMPLATES == t
    assert t[0] == "a photo of a person {}."
    assert t[3] == "a demonstration of a person {}."
    assert t[4] == "a photo of the person {}."
    assert t[8] == "a photo of a person using {}."
    assert t[16] == "a photo of a person doing {}."
    assert t[24] == "a photo of a person during {}."
    assert t[32] == "a photo of a person performing {}."
    assert t[-1] == "a demonstration of the person practicing {}."
    assert "a example of the person using {}." in t  # CLIP's own spelling
    assert all(s.count("{}") == 1 and s.endswith("{}.") for s in t)


def test_camel_case_to_words():
    assert prompts.camel_case_to_words("ApplyEyeMakeup") == "Apply Eye Makeup"
    assert prompts.camel_case_to_words("YoYo") == "Yo Yo"
    assert prompts.camel_case_to_words("HandstandPushups") == "Handstand Pushups"
    assert prompts.camel_case_to_words("Punch") == "Punch"
    assert prompts.camel_case_to_words("TVShow") == "TV Show"


def test_class_prompts():
    out = prompts.class_prompts(["Yo Yo", "a{b}"], ("a photo of {}.", "{}"))
    assert out == [["a photo of Yo Yo.", "Yo Yo"], ["a photo of a{b}.", "a{b}"]]
    with pytest.raises(ValueError):
        prompts.class_prompts(["x"], ("no slot",))


# ---------------------------------------------------------------- real annotation files


def test_ucf101_real_split1(tmp_path):
    lists = tmp_path / "ucf101" / "ucfTrainTestlist"
    copy_into(real("ucf101/classInd.txt"), lists / "classInd.txt")
    copy_into(real("ucf101/testlist01.txt"), lists / "testlist01.txt")
    ds = ucf101.load(tmp_path / "ucf101")
    assert ds.name == "ucf101" and ds.task == CLASSIFICATION
    assert len(ds.items) == 3783 and len(ds.classes) == 101
    assert ds.classes[0] == "Apply Eye Makeup" and ds.classes[-1] == "Yo Yo"
    assert ds.templates == prompts.UCF101_TEMPLATES
    assert {item.label for item in ds.items} == set(range(101))
    assert_unique_ids(ds)
    # Same class names as the authors' regex gives for every class.
    folders = [line.split()[1] for line in (lists / "classInd.txt").read_text().splitlines()]
    assert ds.classes == [" ".join(re.findall(r"[a-zA-Z][^A-Z]*", f)) for f in folders]
    # The folder decides: HandstandPushups/ holds v_HandStandPushups_* files.
    hsp = [item for item in ds.items if "HandStandPushups" in item.id]
    assert hsp and all(ds.classes[item.label] == "Handstand Pushups" for item in hsp)
    first = ds.items[0]
    assert first.id == "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi" and first.label == 0
    assert Path(first.video) == tmp_path / "ucf101" / "UCF-101" / "ApplyEyeMakeup" / "v_ApplyEyeMakeup_g01_c01.avi"
    assert not any("\r" in item.video for item in ds.items)


def test_youcook2_real_validation(tmp_path):
    copy_into(real("youcook2/validation_youcook.csv"), tmp_path / "youcook2" / "validation_youcook.csv")
    ds = youcook2.load(tmp_path / "youcook2")
    assert ds.task == RETRIEVAL
    assert len(ds.items) == 3350
    assert len({Path(item.video).stem for item in ds.items}) == 436
    assert all(item.window[0] < item.window[1] for item in ds.items)
    assert_unique_ids(ds)
    first = ds.items[0]  # csv row: 60,47,226,pick the ends off the verdalago,xHr8X2Wpmno (end before start)
    assert first.window == (47.0, 60.0) and first.text == "pick the ends off the verdalago"
    assert Path(first.video) == tmp_path / "youcook2" / "videos" / "226" / "xHr8X2Wpmno.mp4"


def test_didemo_real_test_paragraphs(tmp_path):
    src = real("didemo/test_data.json")
    copy_into(src, tmp_path / "didemo" / "test_data.json")
    ds = didemo.load(tmp_path / "didemo", merge_same_video=False)  # one item per `video` name
    assert ds.task == RETRIEVAL
    assert len(ds.items) == 1037
    assert_unique_ids(ds)
    entries = json.loads(src.read_text())
    assert len(entries) == 4021
    known = "26292851@N04_4253489686_265c3c8051.m4v"
    descriptions = [e["description"] for e in entries if e["video"] == known]
    assert len(descriptions) > 1
    item = next(item for item in ds.items if item.id == known)
    assert item.text == " ".join(descriptions)
    assert item.text.startswith("someone kicks the bug towards some rocks. ")
    assert Path(item.video) == tmp_path / "didemo" / "videos" / known  # no videos here: the expected path
    assert sum(item.id.endswith(".") for item in ds.items) == 31


def test_didemo_real_default_is_one_item_per_video_file(tmp_path):
    copy_into(real("didemo/test_data.json"), tmp_path / "test_data.json")
    test_list = real("didemo/test_list.txt").read_text().split()
    ds = didemo.load(tmp_path)  # what eval.run uses: 33 files named twice are one candidate each, not two
    assert len(ds.items) == 1004
    assert {item.id for item in ds.items} == {didemo.video_stem(name) for name in test_list}
    assert sum(len(item.text) for item in ds.items) > 0


def test_moments_real_class_names(tmp_path):
    names = real("moments_in_time/class_names.txt")
    classes = moments.read_categories(names)
    assert len(classes) == 339 and len(set(classes)) == 339
    assert classes[0] == "clapping" and "adult+female+singing" in classes
    # The official form "name,index" gives the same order; a tiny validation csv parses against either.
    indexed = tmp_path / "moments_categories.txt"
    indexed.write_text("".join(f"{name},{i}\n" for i, name in reversed(list(enumerate(classes)))))
    assert moments.read_categories(indexed) == classes
    (tmp_path / "validationSet.csv").write_text("clapping/a.mp4,clapping,3,0\npraying/b.mp4,praying,2,1\n")
    ds = moments.load(tmp_path, categories=names)
    assert ds.classes == classes and ds.templates == ("{}",)
    assert [item.label for item in ds.items] == [classes.index("clapping"), classes.index("praying")]
    assert Path(ds.items[0].video) == tmp_path / "validation" / "clapping" / "a.mp4"


# ---------------------------------------------------------------- generated layouts


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict[str, Path]:
    start = time.monotonic()
    result = fixtures.make_layouts(tmp_path_factory.mktemp("benchmarks"))
    assert time.monotonic() - start < 15
    return result


def test_registry():
    assert set(DATASETS) == {"ucf101", "moments", "msrvtt", "youcook2", "didemo"}


def test_fixture_layouts_parse_with_one_missing_video_each(layouts):
    missing = {**fixtures.MISSING, "ucf101": fixtures.ucf101_missing_id()}
    for name, root in layouts.items():
        ds = DATASETS[name](root)
        assert ds.name == name
        assert_unique_ids(ds)
        absent = [item.id for item in ds.items if not Path(item.video).is_file()]
        assert absent == [missing[name]], name
        for source in ds.sources:
            assert Path(source).is_file()


def test_fixture_classification_layouts(layouts):
    ucf = ucf101.load(layouts["ucf101"])
    assert ucf.classes == ["Apply Eye Makeup", "Handstand Pushups", "Yo Yo"]
    assert len(ucf.items) == 3 * 2 + 1
    assert [ucf.classes[i.label] for i in ucf.items if "HandStand" in i.id] == ["Handstand Pushups"] * 2
    mit = moments.load(layouts["moments"])
    assert mit.classes == ["clapping", "praying", "adult+female+singing"]
    assert len(mit.items) == 3 * 2 + 1 and mit.items[-1].label == 1


def test_fixture_retrieval_layouts(layouts):
    msr = msrvtt.load(layouts["msrvtt"])
    assert [i.text for i in msr.items][:2] == ["a video of a red screen", "a video of a green screen"]
    assert msr.items[-1].video.endswith("video9004.mp4")
    yc = youcook2.load(layouts["youcook2"])
    assert [i.window for i in yc.items] == [(0.0, 1.0), (1.0, 2.0), (0.0, 1.0), (1.0, 2.0), (1.0, 3.0)]
    assert yc.items[2].video.endswith("BlUe5kcWpQ0.mkv") and Path(yc.items[2].video).is_file()  # any extension
    dd = didemo.load(layouts["didemo"])
    assert len(dd.items) == 5
    assert dd.items[0].text == "a red screen appears. a red screen stays on screen."


def test_didemo_odd_extensions_resolve(layouts):
    items = {item.id: item for item in didemo.load(layouts["didemo"], merge_same_video=False).items}
    mov = items["10000002@N00_1000000002_bbbbbbbbbb.mov"]  # stored as .mp4
    assert mov.video.endswith("bbbbbbbbbb.mp4") and Path(mov.video).is_file()
    bare = items["10000003@N00_1000000003_cccccccccc."]  # the json name ends in a bare '.'
    assert bare.video.endswith("cccccccccc.mp4") and Path(bare.video).is_file()
    gone = didemo.load(layouts["didemo"]).items[-1]
    assert gone.id == fixtures.MISSING["didemo"]
    assert Path(gone.video) == layouts["didemo"] / "videos" / "10000005@N00_1000000005_eeeeeeeeee.m4v"


def test_didemo_one_candidate_per_video_file(layouts):
    """The green video is named .mov and .mp4 in the json: by default one item, both names' descriptions."""
    merged = didemo.load(layouts["didemo"])
    assert len(merged.items) == 5 and len({item.video for item in merged.items}) == 5
    green = next(item for item in merged.items if "bbbbbbbbbb" in item.id)
    assert green.id == "10000002@N00_1000000002_bbbbbbbbbb" and green.text.count("a green screen") == 4
    apart = didemo.load(layouts["didemo"], merge_same_video=False)
    assert len(apart.items) == 6 and len({item.video for item in apart.items}) == 5
    val = didemo.load(layouts["didemo"], split="val")
    assert len(val.items) == 2 and val.sources[0].endswith("val_data.json")


def test_didemo_double_extension_and_override(tmp_path, layouts):
    videos = tmp_path / "elsewhere"
    videos.mkdir()
    (videos / "10000001@N00_1000000001_aaaaaaaaaa.mp4.webm").write_bytes(b"x")  # e.g. a re-encoded download
    ds = didemo.load(layouts["didemo"], videos=videos)
    assert ds.items[0].video == str(videos / "10000001@N00_1000000001_aaaaaaaaaa.mp4.webm")
    assert not Path(ds.items[1].video).exists()


def test_alternative_annotation_forms_agree(layouts):
    root = layouts["msrvtt"]
    from_csv = msrvtt.load(root)
    from_json = msrvtt.load(
        root,
        test_list=root / "structured-symlinks" / "val_list_jsfusion.txt",
        annotations=root / "annotation/MSR_VTT.json",
    )
    assert [(i.id, i.video, i.text) for i in from_json.items] == [(i.id, i.video, i.text) for i in from_csv.items]
    root = layouts["youcook2"]
    from_csv = youcook2.load(root)
    from_json = youcook2.load(root, annotations=root / youcook2.JSON_NAME)  # the training video is left out
    assert from_json.items == from_csv.items


def test_youcook2_falls_back_to_official_json(tmp_path, layouts):
    root = tmp_path / "yc"
    shutil.copytree(layouts["youcook2"], root)
    (root / youcook2.CSV_NAME).unlink()
    ds = youcook2.load(root)
    assert len(ds.items) == 5 and ds.sources == (str(root / youcook2.JSON_NAME),)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("ucf101", "ucfTrainTestlist/classInd.txt"),
        ("moments", "moments_categories.txt"),
        ("msrvtt", "MSRVTT_JSFUSION_test.csv"),
        ("youcook2", "validation_youcook.csv"),
        ("didemo", "test_data.json"),
    ],
)
def test_annotations_missing_names_the_path(tmp_path, name, expected):
    with pytest.raises(AnnotationsMissing) as info:
        DATASETS[name](tmp_path)
    assert info.value.path == str(tmp_path / expected)
    assert str(tmp_path / expected) in str(info.value)
    assert isinstance(info.value, FileNotFoundError)


def test_annotations_missing_second_file_and_overrides(tmp_path, layouts):
    root = tmp_path / "ucf"
    shutil.copytree(layouts["ucf101"] / "ucfTrainTestlist", root / "ucfTrainTestlist")
    with pytest.raises(AnnotationsMissing, match="testlist02.txt"):
        ucf101.load(root, split=2)
    with pytest.raises(AnnotationsMissing, match="validationSet.csv"):
        moments.load(tmp_path, categories=layouts["moments"] / "moments_categories.txt")
    with pytest.raises(AnnotationsMissing, match="nowhere.json"):
        msrvtt.load(layouts["msrvtt"], annotations=tmp_path / "nowhere.json")
    with pytest.raises(AnnotationsMissing, match="val_data.json"):
        didemo.load(tmp_path, split="val")


def test_malformed_files_fail_loudly(tmp_path):
    (tmp_path / "validation_youcook.csv").write_text("end,start,task,text,video_id\n5,7,101,backwards,abc\n")
    with pytest.raises(ValueError, match="start < end"):
        youcook2.load(tmp_path)
    lists = tmp_path / "ucfTrainTestlist"
    lists.mkdir()
    (lists / "classInd.txt").write_text("1 Archery\r\n")
    (lists / "testlist01.txt").write_text("Bowling/v_Bowling_g01_c01.avi\r\n")
    with pytest.raises(ValueError, match="Bowling"):
        ucf101.load(tmp_path)
    (tmp_path / "moments_categories.txt").write_text("a,0\nb,2\n")
    with pytest.raises(ValueError, match="indices"):
        moments.load(tmp_path)
    with open(tmp_path / "MSRVTT_JSFUSION_test.csv", "w", newline="") as f:
        rows = [["key", "vid_key", "video_id", "sentence"], ["ret0", "msr1", "video1", "x"]]
        rows.append(["ret1", "msr1", "video1", "y"])
        csv.writer(f).writerows(rows)
    with pytest.raises(ValueError, match="repeat"):
        msrvtt.load(tmp_path)


YC_HEADER = "end,start,task,text,video_id\n"


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        # a short row: a missing video named None_1, or a traceback after every video was decoded
        ("validation_youcook.csv", YC_HEADER + "2,1,226\n", "validation_youcook.csv:2: a row with fewer fields"),
        ("validation_youcook.csv", YC_HEADER + "2,one,226,x,abc\n", "start and end must be numbers"),
        ("MSRVTT_JSFUSION_test.csv", "key,vid_key,video_id,sentence\nret0,msr0,video0\n", "csv:2: a row with fewer"),
        # tracebacks at load: a list where an object was expected, a null text, an entry without its caption
        (youcook2.JSON_NAME, "[]", "not the layout expected (TypeError"),
        (youcook2.JSON_NAME, '{"database": {"v": {"subset": "validation", "recipe_type": 1}}}', "KeyError"),
        (
            youcook2.JSON_NAME,
            '{"database": {"v": {"subset": "validation", "recipe_type": 1, "annotations": '
            '[{"segment": [0, 1], "sentence": null}]}}}',
            "the sentence is not a text: None",
        ),
        ("test_data.json", '[{"video": "a.mp4", "description": null}]', "lacks a 'video' or 'description' text"),
        ("annotation/MSR_VTT.json", '{"annotations": [{"image_id": "video0"}]}', "KeyError: 'caption'"),
        ("annotation/MSR_VTT.json", '{"annotations": [{"image_id": "video0", "caption": 3}]}', "is not a text: 3"),
    ],
)
def test_a_malformed_annotation_file_is_a_value_error_naming_it(tmp_path, name, content, expected):
    """eval.run turns a ValueError into one error line naming the dataset and the file; these gave a traceback, or
    loaded a broken row as a missing video."""
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    dataset = {"validation": "youcook2", "youcookii": "youcook2", "MSR": "msrvtt", "test_data": "didemo"}
    load = DATASETS[next(v for k, v in dataset.items() if k in name)]
    if name.startswith("annotation/"):  # the JSFusion list beside the json
        (tmp_path / "structured-symlinks").mkdir()
        (tmp_path / "structured-symlinks" / "val_list_jsfusion.txt").write_text("video0\n")
    with pytest.raises(ValueError) as info:
        load(tmp_path)
    assert str(path) in str(info.value) and expected in str(info.value), info.value


def test_msrvtt_missing_annotations_name_the_files_and_folders_that_are_read(tmp_path):
    """The hint named test_list= and annotations=, which no CLI takes."""
    from eval.datasets import msrvtt

    with pytest.raises(AnnotationsMissing) as e:
        msrvtt.load(tmp_path)
    assert "val_list_jsfusion.txt in ROOT (or ROOT/structured-symlinks/) and MSR_VTT.json in ROOT" in str(e.value)
    assert "test_list=" not in str(e.value)


def test_annotation_files_saved_with_a_byte_order_mark_parse_as_without(tmp_path, layouts):
    """An editor or Excel on Windows saves UTF-8 with a BOM: UCF101's class list was refused ("expected 'ID
    ClassName', got '\\ufeff1 ApplyEyeMakeup'"), DiDeMo's json ("Unexpected UTF-8 BOM"), and likewise the others."""
    for name, root in layouts.items():
        marked = tmp_path / name
        shutil.copytree(root, marked, ignore=shutil.ignore_patterns("videos"))
        shutil.copytree(root / "videos", marked / "videos") if (root / "videos").is_dir() else None
        files = [p for p in marked.rglob("*") if p.is_file() and p.suffix in (".txt", ".csv", ".json")]
        assert files, name
        for path in files:
            path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
        plain, bom = DATASETS[name](root), DATASETS[name](marked)
        assert [(i.id, i.label, i.text, i.window) for i in bom.items] == [
            (i.id, i.label, i.text, i.window) for i in plain.items
        ], name
        assert bom.classes == plain.classes, name
