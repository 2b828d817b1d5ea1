"""The benchmark CLIs refuse bad flags, as fire hands them over, in one ``error:`` line that names the flag, before any
work and without writing anything; and their ``--help`` says what the code does where an audit found it did not
(that every flag's help is shown whole: tests/test_cli_args.py, for every CLI).

In process (``main(...)``): a CLI start costs seconds, and the suite has a time budget. The work each script would
start (models, clips, compiles, the loader) is replaced by a tripwire, so a check that comes too late fails here.
"""

from __future__ import annotations

import importlib
import io
import json
import tarfile

import fire.docstrings
import pytest
import torch
from conftest import TINY_CLIP

TINY = str(TINY_CLIP)


class WorkStarted(Exception):
    """Raised by the tripwires: the script went on to real work."""


def tripwire(*args, **kwargs):
    raise WorkStarted("work started")


@pytest.fixture
def no_work(monkeypatch):
    """The work each script starts after its checks made to raise ``WorkStarted``, and no CUDA GPU to be seen (so the
    --device cuda refusal is the same on a GPU machine)."""
    from benchmarks import batch_bench, eval_bench, harness, loader_bench, shard_bench, text_bench, train_step
    from train import distributed, loop

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for module, name in (
        (torch, "compile"),
        (distributed, "init_distributed"),  # every torch script's first step once its flags are checked
        (loop, "build_models"),
        (harness, "create_clip"),
        (train_step, "set_up"),
        (loader_bench, "jpeg_limit"),
        (eval_bench, "ensure_clips"),
        (batch_bench, "ensure_clips"),
        (batch_bench, "create_clip"),
        (text_bench, "create_clip"),
        (shard_bench, "ensure_clips"),
        (shard_bench, "machine_info"),
    ):
        monkeypatch.setattr(module, name, tripwire)


def fake_shards(folder, frames: int = 4):
    """A shard folder as pipeline.shard leaves it, as far as the checks read it: one tar whose sample holds
    ``frames`` JPEG members (empty), and its stats file."""
    folder.mkdir()
    with tarfile.open(folder / "000000.tar", "w") as tar:
        for name in [f"{k}.jpg" for k in range(frames)] + ["txt"]:
            info = tarfile.TarInfo(f"000000000.{name}")
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
    (folder / "000000_stats.json").write_text(json.dumps({"ok": 1, "count": 1}))
    return str(folder)


# (script, flags, the start of the refusal after "error: "); each script's own base flags are added (BASE)
REFUSED = [
    ("train_step", {"steps": "abc"}, "--steps must be a whole number of at least 1, got 'abc'"),
    ("train_step", {"steps": 0}, "--steps must be a whole number"),
    ("train_step", {"warmup": -1}, "--warmup must be a whole number of at least 0"),
    ("train_step", {"threads": "abc"}, "--threads must be a whole number of at least 0"),
    ("train_step", {"seed": 1.5}, "--seed must be a whole number"),
    ("train_step", {"batch_labeled": 0, "batches": ""}, "--batch_labeled must be a whole number"),
    ("train_step", {"peak_tflops": "abc"}, "--peak_tflops must be a number of at least 0, got 'abc'"),
    ("train_step", {"device": "gpu"}, "--device must be auto, cuda or cpu, got 'gpu'"),
    ("train_step", {"device": "cuda"}, "--device cuda, but no CUDA GPU is visible to torch; pass --device cpu or auto"),
    ("train_step", {"compile": "no"}, "--compile must be True or False, got 'no'"),
    ("train_step", {"trim_text": "no"}, "--trim_text must be True or False"),
    ("train_step", {"grad_checkpointing": "no"}, "--grad_checkpointing must be True"),
    ("train_step", {"recipe": "fast"}, "--recipe must be one of"),
    ("train_step", {"precision": "fp8"}, "--precision must be one of"),
    ("step_variants", {"steps": 0}, "--steps must be a whole number of at least 1, got 0"),
    ("step_variants", {"steps": "abc"}, "--steps must be a whole number"),
    ("step_variants", {"warmup": "abc"}, "--warmup must be a whole number of at least 0"),
    ("step_variants", {"profile": -1}, "--profile must be a whole number of at least 0"),
    ("step_variants", {"memory_gib": "abc"}, "--memory_gib must be a number of at least 0"),
    ("step_variants", {"device": "gpu"}, "--device must be auto, cuda or cpu, got 'gpu'"),
    ("step_variants", {"variants": "ours+foo"}, "--variants 'ours+foo': unknown ['foo']; options:"),
    ("step_variants", {"variants": ""}, "--variants must name at least one variant"),
    ("kernel_bench", {"device": "gpu"}, "--device must be auto, cuda or cpu, got 'gpu'"),
    ("kernel_bench", {"device": "cuda"}, "--device cuda, but no CUDA GPU is visible"),
    ("kernel_bench", {"batches": "1x1,2x2"}, "--batches takes one LxU here"),
    ("epilogue_bench", {"device": "gpu"}, "--device must be auto, cuda or cpu, got 'gpu'"),
    ("epilogue_bench", {"frames": "abc"}, "--frames must be a whole number of at least 1"),
    ("loader_bench", {"shards": "no/such/folder"}, "--shards 'no/such/folder': shard folder"),
    ("loader_bench", {"frames": 5}, "--frames 5: the samples in"),  # the fake shards hold 4
    ("loader_bench", {"workers": "abc"}, "--workers must be a comma list of whole numbers of at least 1"),
    ("loader_bench", {"workers": 0}, "--workers must be a comma list"),
    ("loader_bench", {"workers": (2, 0)}, "--workers must be a comma list"),  # --workers 2,0
    ("loader_bench", {"batch": 0}, "--batch must be a whole number of at least 1"),
    ("loader_bench", {"batches": 0}, "--batches must be a whole number of at least 1"),
    ("loader_bench", {"size": "big"}, "--size must be a whole number"),
    ("loader_bench", {"settle": -1}, "--settle must be a whole number of at least 0"),
    ("loader_bench", {"augment_on": "gpu"}, "--augment_on must be a comma list of loader, device, device_jpeg"),
    ("loader_bench", {"device": "gpu"}, "--device must be auto, cuda or cpu"),
    ("loader_bench", {"model": "nosuch"}, "--model 'nosuch'"),
    ("eval_bench", {"videos": 0}, "--videos must be a whole number of at least 1"),
    ("eval_bench", {"repeats": 0}, "--repeats must be a whole number of at least 1"),
    ("eval_bench", {"workers": "abc"}, "--workers must be a comma list"),
    ("eval_bench", {"workers": 0}, "--workers must be a comma list"),
    ("eval_bench", {"batch_size": 0}, "--batch_size must be a whole number of at least 1"),
    ("eval_bench", {"classes": 0}, "--classes must be a whole number from 1 to 101"),
    ("eval_bench", {"classes": 102}, "--classes must be a whole number from 1 to 101"),
    ("eval_bench", {"sweep": 0}, "--sweep must be a whole number of at least 1"),
    ("eval_bench", {"threads": "one"}, "--threads must be a whole number of at least 0"),
    ("eval_bench", {"seconds": 0}, "--seconds must be a number of at least 0.4"),
    ("eval_bench", {"device": "gpu"}, "--device must be auto, cuda or cpu"),
    ("shard_bench", {"repeats": 0}, "--repeats must be a whole number of at least 1"),
    ("shard_bench", {"gops": "abc"}, "--gops must be a comma list of keyframe intervals"),
    ("shard_bench", {"gops": -5}, "--gops must be a comma list of keyframe intervals"),
    ("shard_bench", {"videos": 0}, "--videos must be a whole number of at least 1"),
    ("shard_bench", {"clips": 0}, "--clips must be a whole number of at least 1"),
    ("shard_bench", {"pipeline_videos": "all"}, "--pipeline_videos must be a whole number"),
    ("shard_bench", {"workers": 0}, "--workers must be a comma list"),
    ("shard_bench", {"samples_per_shard": 0}, "--samples_per_shard must be a whole number of at least 1"),
    ("shard_bench", {"seconds": "long"}, "--seconds must be a number of at least 0.4"),
    ("batch_bench", {"seconds": "abc"}, "--seconds must be a number of at least 0.4, got 'abc'"),
    ("batch_bench", {"seconds": 0}, "--seconds must be a number of at least 0.4, got 0"),
    ("batch_bench", {"sizes": "1,x"}, "--sizes must be a comma list"),
    ("batch_bench", {"videos": 0}, "--videos must be a whole number"),
    ("batch_bench", {"device": "gpu"}, "--device must be auto, cuda or cpu, got 'gpu'"),
    ("batch_bench", {"model": "nosuch"}, "--model 'nosuch'"),
    ("text_bench", {"device": "gpu"}, "--device must be auto, cuda or cpu, got 'gpu'"),
    ("text_bench", {"device": "cuda"}, "--device cuda, but no CUDA GPU is visible"),
    ("text_bench", {"train_batch": 0}, "--train_batch must be a whole number"),
    ("gpu_numerics", {"batch": 0}, "--batch must be a whole number of at least 1, got 0"),
    ("gpu_numerics", {"batch": "abc"}, "--batch must be a whole number of at least 1, got 'abc'"),
    ("gpu_numerics", {"model": "nosuch"}, "--model 'nosuch' is neither an open_clip model name"),
    ("gpu_numerics", {"compile": "no"}, "--compile must be True or False, got 'no'"),
    ("gpu_numerics", {"packed_qkv": "yes"}, "--packed_qkv must be True or False"),
    ("gpu_numerics", {"attention_kernel": "fast"}, "--attention_kernel must be one of auto, cudnn"),
    ("gpu_numerics", {"frames": 0}, "--frames must be a whole number"),
    ("issue6_verdict", {}, "--out"),  # no such folder
    ("issue6_verdict", {"out": "SHARDS", "levers": "ours+qkv"}, "--levers must be a step variant that starts with"),
]
REFUSED += [  # a flag that names a file where a folder must be made
    (script, {"out": "FILE/out"}, "--out")
    for script in ("train_step", "step_variants", "kernel_bench", "loader_bench", "eval_bench", "shard_bench")
]
BASE = {  # flags that make the rest of a call valid
    "train_step": {"model": TINY, "batches": "1x1"},
    "step_variants": {"model": TINY, "batches": "1x1"},
    "kernel_bench": {"model": TINY, "batches": "1x1"},
    "epilogue_bench": {"model": TINY, "batches": "1x1"},
    "loader_bench": {"model": TINY, "shards": "SHARDS"},
    "batch_bench": {"model": TINY},
    "text_bench": {"model": TINY},
    "gpu_numerics": {"model": TINY},
}


def call(script: str, flags: dict, tmp_path):
    """``benchmarks.SCRIPT.main`` with ``BASE``'s flags, then ``flags``, writing into ``tmp_path/out``; the
    placeholders SHARDS (4-frame shards) and FILE (a file) made in ``tmp_path``."""
    (tmp_path / "FILE").write_text("")
    shards = fake_shards(tmp_path / "shards")
    given = {"out": str(tmp_path / "out"), **BASE.get(script, {}), **flags}
    given = {
        k: v.replace("SHARDS", shards).replace("FILE", str(tmp_path / "FILE")) if isinstance(v, str) else v
        for k, v in given.items()
    }
    return importlib.import_module(f"benchmarks.{script}").main(**given)


@pytest.mark.parametrize("script, flags, says", REFUSED, ids=[f"{s}-{'-'.join(f)}" for s, f, _ in REFUSED])
def test_each_benchmark_refuses_a_bad_flag_in_one_line_before_any_work(no_work, tmp_path, script, flags, says):
    with pytest.raises(SystemExit) as refusal:
        call(script, flags, tmp_path)
    message = str(refusal.value)
    assert message.startswith(f"error: {says}") and "\n" not in message, message
    assert not (tmp_path / "out").exists()


# each script as benchmarks/gpu_step.sh (or its README) calls it: the checks pass it on to the work
VALID = [
    ("train_step", {"frames": 4, "steps": 5, "warmup": 2, "compile": True, "grad_checkpointing": 6}),
    (
        "step_variants",
        {"steps": 5, "warmup": 2, "profile": 2, "memory_gib": 78, "variants": "naive,ours+compile+ckpt6"},
    ),
    ("kernel_bench", {"out": ""}),
    ("epilogue_bench", {"frames": 4}),
    ("loader_bench", {"workers": 6, "batch": 128, "batches": 8, "settle": 1000, "augment_on": ("loader", "device")}),
    ("eval_bench", {"videos": 2, "seconds": 1, "workers": 1, "repeats": 1, "classes": 3, "sweep": 2, "device": "cpu"}),
    ("shard_bench", {"gops": ("default", 50), "workers": (1, 2), "seconds": 0.4}),
    ("batch_bench", {"sizes": (1, 8), "seconds": 1.5}),
    ("text_bench", {"batch_size": 16, "train_batch": 8, "repeats": 1}),
    ("gpu_numerics", {"batch": 16, "compile": False, "packed_qkv": True, "attention_kernel": "cudnn"}),
]


@pytest.mark.parametrize("script, flags", VALID, ids=[s for s, _ in VALID])
def test_a_valid_call_passes_the_checks(no_work, tmp_path, script, flags):
    with pytest.raises(WorkStarted):
        call(script, flags, tmp_path)


HELP = [  # (script, flag or "" for the description, words its help must hold): what the code does
    (
        "kernel_bench",
        "",
        "the image tower's last block and the text tower both ways; with --out DIR, write DIR/kernels.json",
    ),
    ("kernel_bench", "out", '"" = print only, write nothing'),
    ("epilogue_bench", "", "with --out DIR, write DIR/epilogue.json"),
    ("gpu_prep", "videos", "videos // 4 (at least 1) to a shard"),
    ("eval_bench", "sweep", "projected from the measured parts (decode, video and text encoding), not run"),
    ("loader_bench", "batches", "the median over the first 10 of them (the first left out)"),
    ("train_step", "grad_checkpointing", "a number N the first N blocks of each tower, False or 0 none"),
]


@pytest.mark.parametrize("script, flag, words", HELP)
def test_help_says_what_the_code_does(script, flag, words):
    parsed = fire.docstrings.parse(importlib.import_module(f"benchmarks.{script}").main.__doc__)
    text = parsed.summary if not flag else next(a.description for a in parsed.args if a.name == flag)
    assert words in " ".join(text.split())
