"""benchmarks/gpu_step.sh, the script a GPU session runs once, run whole on the CPU with the tiny model.

A GPU machine is lent to few sessions, for minutes; a script that fails there (a part's flags, the LEVERS the
kernels part picks, an import the machine cannot satisfy) costs a whole lending. So the suite runs it here, with
the Python packages the GPU machine's image lacks made unimportable, as they are there. It checks the script's
parts, the variants and flags it hands each CLI, and what it writes, not the speed of anything.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

# Packages this project needs that the GPU machines' image ("cuda", for nvidia-h100-x1 and nvidia-h200) does not hold,
# and that gpu_step.sh does not carry as wheels (.whl/: open_clip_torch, webdataset, fire and their own small
# dependencies): the image's package list in the device tool's KINDS.md, as read on 2026-11-17.
NOT_ON_THE_GPU_MACHINE = ("av", "ffmpeg", "imageio_ffmpeg", "wandb", "pyspark")

DEFAULT = "ours+compile+cteacher"  # the trainer's GPU default step, as gpu_step.sh names it
FILES = [
    "epilogue.json",
    "gpu_step.log",
    "kernels.json",
    "numerics.json",
    "step_variants_cpu.json",
    "tune/step_variants_cpu.json",
    "verdict.log",
]


def run_script(tmp_path: Path, **variables: str) -> subprocess.CompletedProcess:
    """``bash benchmarks/gpu_step.sh`` with the tiny model at 2+2 and ``variables``, as on the GPU machine: ``python3``
    is this interpreter, and the packages of ``NOT_ON_THE_GPU_MACHINE`` cannot be imported."""
    blocked = tmp_path / "not_on_the_gpu_machine"
    blocked.mkdir()
    for name in NOT_ON_THE_GPU_MACHINE:  # found before the installed package, as if it were not there
        (blocked / f"{name}.py").write_text(f"raise ImportError('{name} is not on the GPU machine')\n")
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": f"{blocked}{os.pathsep}{REPO}",
        "OMP_NUM_THREADS": "1",
        # torch.compile made a no-op: the compiled steps are checked elsewhere (test_step_numerics, test_benchmarks,
        # test_train); here compiling the 7 compiled variants would add about 2 minutes with a cold inductor cache
        "TORCHDYNAMO_DISABLE": "1",
        **dict(MODEL="tests/data/tiny-clip.json", BATCH="2x2"),
        **variables,
    }
    check = subprocess.run(["python3", "-c", "import av"], env=env, capture_output=True, text=True)
    assert "av is not on the GPU machine" in check.stderr  # the packages are really out of reach
    return subprocess.run(["bash", "benchmarks/gpu_step.sh"], cwd=REPO, env=env, capture_output=True, text=True)


@pytest.mark.slow
def test_the_gpu_script_runs_every_default_part_without_the_packages_the_gpu_machine_lacks(train_shards, tmp_path):
    data = tmp_path / "shards"  # the layout of demo_output/shards, which the train part reads on the GPU machine
    data.mkdir()
    for name, source in (("labeled", "labeled"), ("train", "unlabeled"), ("val", "val")):
        (data / name).symlink_to(train_shards[source])
    out, runs = tmp_path / "out", tmp_path / "runs"
    runs.mkdir()
    proc = run_script(tmp_path, OUT=str(out), TRAIN_DATA=str(data), RUN_DIR=str(runs))
    log = (out / "gpu_step.log").read_text() if (out / "gpu_step.log").exists() else proc.stdout
    assert proc.returncode == 0, (log + proc.stderr)[-4000:]
    assert "Traceback" not in log and "is not on the GPU machine" not in log, log[-4000:]
    started = [line[len("gpu_step: ") :].split(" part, ")[0] for line in log.splitlines() if " part, at most " in line]
    assert started == ["kernels", "step", "numerics", "train (device_jpeg)", "epilogue", "tune"]
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == FILES

    # LEVERS: the default with +qkv and what the kernels part chose; the step and tune parts time it
    chosen = "".join("+" + o for o in json.loads((out / "kernels.json").read_text())["step_levers"])
    levers = f"{DEFAULT}+qkv{chosen}"
    assert f"gpu_step: LEVERS={levers} (trainer flags: --packed_qkv True" in log
    step = json.loads((out / "step_variants_cpu.json").read_text())["rows"]
    assert [r["variant"] for r in step] == [
        "naive",
        DEFAULT,
        levers,
        f"{levers}+prefetch",
        f"{levers}+prefetch+tahead",
        f"{levers}+prefetch+tstream",
        f"{DEFAULT}+devjpeg+qkv{chosen}",
    ]
    tune = json.loads((out / "tune" / "step_variants_cpu.json").read_text())["rows"]
    assert [r["variant"] for r in tune] == [f"{levers}+autotune+tma", f"{levers}+autotune"]
    assert all(r["status"] == "ok" for r in step + tune)
    assert (runs / "run_device_jpeg" / "summary.json").is_file()

    verdict = (out / "verdict.log").read_text()
    numerics = [line for line in verdict.splitlines() if line.startswith("  numerics on CPU with ")]
    assert len(numerics) == 1 and "--packed_qkv True" in numerics[0] and numerics[0].endswith(": MET"), verdict
    assert "--teacher_stream ahead" in numerics[0]  # the checks run the teacher on its own stream too
    assert "the teacher beside the student's forward: " in verdict
    assert "the next step's teacher beside the backward: " in verdict
    assert "MLP halves alone" in verdict
    assert f"  the batch's copy overlapped, as the trainer feeds the step: {levers}+prefetch " in verdict
    # both max-autotune variants were timed: no second call; the line reaches the output the device tool brings back
    done = "  next call: none needed (both max-autotune variants were timed); give the machine back"
    assert verdict.splitlines()[-1] == done
    assert verdict.splitlines()[-1] in proc.stdout


@pytest.mark.slow
def test_the_second_calls_tune_part_runs_on_the_levers_it_is_given(tmp_path):
    """The second call of a lent session (benchmarks/README.md, "The next GPU run"): the tune part alone on the
    LEVERS the first call chose, with the variants and the time budget given to it."""
    levers, out = f"{DEFAULT}+qkv+patch", tmp_path / "out"
    variants = f"{levers},{levers}+autotune+tma,{levers}+autotune"
    proc = run_script(tmp_path, OUT=str(out), PARTS="tune", LEVERS=levers, TUNE_VARIANTS=variants, BUDGET="200")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert f"gpu_step: LEVERS={levers} (trainer flags: --packed_qkv True --linear_patch_embed True)" in proc.stdout
    tune = json.loads((out / "tune" / "step_variants_cpu.json").read_text())["rows"]
    assert [r["variant"] for r in tune] == variants.split(",")
    verdict = (out / "verdict.log").read_text()
    assert f"max-autotune compile: {levers}+autotune " in verdict
    assert f"max-autotune compile with persistent TMA matmul templates: {levers}+autotune+tma " in verdict
    assert verdict.splitlines()[-1].startswith("  next call: none needed")


def test_a_budget_bounds_every_part_and_a_placeholder_is_refused(tmp_path):
    """The verdict runs inside the device call's limit: a part's limit is cut to what is left of BUDGET (a second
    call's step part used to keep its 290 s against a timeout of 130). The next call's BUDGET placeholder, pasted
    as it is, is refused before any work."""
    proc = run_script(tmp_path, OUT=str(tmp_path / "refused"), BUDGET="SECONDS_LEFT_LESS_40")
    assert proc.returncode == 2 and "BUDGET must be a whole number of seconds" in proc.stderr
    assert not (tmp_path / "refused").exists()
    out = tmp_path / "out"
    (tmp_path / "b").mkdir()
    proc = run_script(tmp_path / "b", OUT=str(out), PARTS="epilogue", BUDGET="60", EPILOGUE_S="600", LEVERS=DEFAULT)
    log = (out / "gpu_step.log").read_text()
    started = [line for line in log.splitlines() if line.startswith("gpu_step: epilogue part, at most ")]
    assert len(started) == 1 and int(started[0].split()[5]) <= 55, log
    assert (out / "verdict.log").is_file()


def test_levers_leave_out_cls_and_patch_when_the_kernels_part_fails(tmp_path):
    """The kernels part is the first to run --cls_last_block and --linear_patch_embed on the GPU: if it fails, the
    parts after it time LEVERS without them (the fallback used to hold both, so that every LEVERS row failed too)."""
    out = tmp_path / "out"
    proc = run_script(tmp_path, OUT=str(out), PARTS="kernels", MODEL=str(tmp_path / "missing.json"))
    assert proc.returncode == 1
    log = (out / "gpu_step.log").read_text()
    assert f"gpu_step: LEVERS={DEFAULT}+qkv (trainer flags: --packed_qkv True)" in log, log
    assert "the kernels part wrote no kernels.json" in log


def test_the_verdict_counts_the_next_call_with_the_scripts_own_limits():
    """issue6_verdict says how many device-seconds a next call needs from two of gpu_step.sh's limits; a change to
    either in the script must reach the verdict, or a lent session starts a call that cannot finish."""
    from benchmarks import issue6_verdict

    script = (REPO / "benchmarks" / "gpu_step.sh").read_text()
    assert re.search(r'^EPILOGUE_S="\$\{EPILOGUE_S:-(\d+)\}"', script, re.M)[1] == str(issue6_verdict.EPILOGUE_S)
    assert re.search(r"^TUNE_MIN_S=(\d+)\b", script, re.M)[1] == str(issue6_verdict.TUNE_MIN_S)
    assert '[ "$tune_s" -lt "$TUNE_MIN_S" ]' in script
