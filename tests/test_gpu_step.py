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

DEFAULT = "ours+compile+cteacher+qkv+patch+cls"  # the trainer's GPU default step, as gpu_step.sh names it
FLAGS = "--packed_qkv True --linear_patch_embed True --cls_last_block True"  # its layer levers as trainer flags
FILES = ["epilogue.json", "gpu_step.log", "step_variants_cpu.json", "verdict.log"]


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
    assert started == ["step", "train (device_jpeg)", "epilogue"]
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == FILES

    # LEVERS: the trainer's default (no kernels part to choose an attention kernel); the step part times it
    assert f"gpu_step: LEVERS={DEFAULT} (trainer flags: {FLAGS}); step variants " in log
    step = json.loads((out / "step_variants_cpu.json").read_text())["rows"]
    fed = f"{DEFAULT}+prefetch"
    assert [r["variant"] for r in step] == ["naive", DEFAULT, fed, f"{fed}+split", f"{fed}+cdt"]
    assert all(r["status"] == "ok" for r in step)
    assert (runs / "run_device_jpeg" / "summary.json").is_file()

    verdict = (out / "verdict.log").read_text()
    assert f"  coordinate-descent tuning of the Triton kernels: {fed}+cdt " in verdict
    assert f"  q, k and v from three products: {fed}+split " in verdict
    assert "MLP halves alone" in verdict
    assert f"  the batch's copy overlapped, as the trainer feeds the step: {fed} " in verdict
    # the next call, from this call's records (on the CPU the timings are noise: +split may look faster, the epilogue's
    # three ways run the same eager code); next_call_lines' own choices are tested in test_benchmarks
    from benchmarks.issue6_verdict import next_call_lines

    records = [json.loads((out / name).read_text()) for name in ("step_variants_cpu.json", "epilogue.json")]
    last = verdict.splitlines()[-1]
    assert last == "  " + next_call_lines(records[0], None, records[1], DEFAULT)[-1], verdict
    assert last in proc.stdout  # the line reaches the output the device tool brings back


@pytest.mark.slow
def test_the_second_calls_tune_part_runs_on_the_levers_it_is_given(tmp_path):
    """The second call of a lent session (benchmarks/README.md, "The next GPU run"): the tune part alone on the
    LEVERS the first call chose, with the variants and the time budget given to it."""
    levers, out = f"{DEFAULT}+flash", tmp_path / "out"
    variants = f"{levers},{levers}+autotune+tma,{levers}+autotune"
    proc = run_script(tmp_path, OUT=str(out), PARTS="tune", LEVERS=levers, TUNE_VARIANTS=variants, BUDGET="200")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert f"gpu_step: LEVERS={levers} (trainer flags: {FLAGS} --attention_kernel flash); step " in proc.stdout
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


def test_levers_are_the_default_with_the_kernel_the_kernels_part_chose(tmp_path):
    """The kernels part adds to the trainer's default only what it is not already: an attention kernel; its +patch
    and +cls are the default's. If it fails, LEVERS is the default."""
    out = tmp_path / "out"
    proc = run_script(tmp_path, OUT=str(out), PARTS="kernels")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    chosen = json.loads((out / "kernels.json").read_text())["step_levers"]
    kernel = [o for o in chosen if o not in DEFAULT.split("+")]
    assert len(kernel) <= 1 and set(chosen) - set(kernel) <= {"patch", "cls"}, chosen
    levers = "+".join([DEFAULT, *kernel])
    assert f"gpu_step: LEVERS={levers} (trainer flags: {FLAGS}" in (out / "gpu_step.log").read_text()
    (tmp_path / "b").mkdir()
    out = tmp_path / "failed"
    proc = run_script(tmp_path / "b", OUT=str(out), PARTS="kernels", MODEL=str(tmp_path / "missing.json"))
    assert proc.returncode == 1
    fed = f"{DEFAULT}+prefetch"
    assert (
        f"gpu_step: LEVERS={DEFAULT} (trainer flags: {FLAGS}); step variants naive,{DEFAULT},{fed},"
        in (out / "gpu_step.log").read_text()
    )


def test_levers_given_are_the_default_with_options_added_and_the_step_times_the_default_beside_them(tmp_path):
    """A LEVERS beyond the default: the step part times the default too (a lever is judged against the step without
    it). A LEVERS that is not the default with known options added is refused before any work: the verdict judges
    and names next calls against the default's name, and used to refuse it only after the device time was spent; an
    option lever_flags does not know was dropped from the checks' flags, so a check without it passed."""
    out = tmp_path / "out"
    levers = f"{DEFAULT}+math"
    proc = run_script(tmp_path, OUT=str(out), PARTS="kernels", LEVERS=levers, MODEL=str(tmp_path / "missing.json"))
    fed = f"{levers}+prefetch"
    assert f"; step variants naive,{DEFAULT},{levers},{fed},{fed}+split,{fed}+cdt\n" in proc.stdout, proc.stdout
    wrongs = ("ours+compile+cteacher+qkv+cls+patch", "ours+compile+cteacher", f"{DEFAULT}math", f"{DEFAULT}+")
    wrongs += (f"{DEFAULT}+flsh", f"{DEFAULT}+flash+math", f"{DEFAULT}+*", f"{DEFAULT}+prefetch")  # not LEVERS' options
    for i, wrong in enumerate(wrongs):
        (tmp_path / f"w{i}").mkdir()  # run_script's own folder
        refused = tmp_path / f"refused{i}"
        proc = run_script(tmp_path / f"w{i}", OUT=str(refused), LEVERS=wrong)
        assert proc.returncode == 2 and f"gpu_step: LEVERS must be {DEFAULT}" in proc.stderr, proc.stderr
        assert not refused.exists()


def test_the_verdict_counts_the_next_call_with_the_scripts_own_limits():
    """issue6_verdict says how many device-seconds a next call needs from three of gpu_step.sh's limits; a change
    to any in the script must reach the verdict, or a lent session starts a call that cannot finish."""
    from benchmarks import issue6_verdict

    script = (REPO / "benchmarks" / "gpu_step.sh").read_text()
    assert re.search(r'^EPILOGUE_S="\$\{EPILOGUE_S:-(\d+)\}"', script, re.M)[1] == str(issue6_verdict.EPILOGUE_S)
    assert re.search(r"^TUNE_MIN_S=(\d+)\b", script, re.M)[1] == str(issue6_verdict.TUNE_MIN_S)
    assert re.search(r'^NUMERICS_S="\$\{NUMERICS_S:-(\d+)\}"', script, re.M)[1] == str(issue6_verdict.NUMERICS_S)
    assert '[ "$tune_s" -lt "$TUNE_MIN_S" ]' in script
