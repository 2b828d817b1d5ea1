"""`make demo`: the whole FitCLIP system end to end on a generated world, on CPU, with no network.

    python -m demo [--out demo_output] [--quick]

1. generate a synthetic video world: WebVid-style train/val CSVs and UCF101 / MSR-VTT benchmark layouts;
2. pre-train a tiny CLIP teacher on still images of that world (it never sees video);
3. shard the videos (pipeline.shard) and draw the labeled subset (pipeline.subset);
4. train the student with torchrun on 2 processes (gloo), W&B offline;
5. fuse (alpha 0.4) and evaluate teacher, student and FitCLIP zero-shot (eval.run), with an alpha sweep.

Every stage reuses what an earlier run finished. The demo checks that the models
beat chance by a wide margin and says so loudly if they do not.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from demo.world import UCF_CLASSES
from pipeline.cli import fire_main, folder_problems, refuse, switch_problems
from pipeline.writer import atomic_write_bytes, json_bytes

MODEL = str(Path(__file__).resolve().parents[1] / "train" / "model_configs" / "demo-clip.json")
MODELS = ("CLIP (teacher)", "Student", "FitCLIP")  # eval.run's --names for the teacher, best.pt and fitclip.pt
DATASETS = ("ucf101", "msrvtt")


@dataclass(frozen=True)
class Sizes:
    """How big each stage is; ``quick`` is the reduced form the tests run."""

    train_videos: int = 400
    val_videos: int = 40
    ucf_per_class: int = 4
    msrvtt_videos: int = 40
    labeled: int = 100
    teacher_images: int = 4000
    teacher_steps: int = 300
    student_steps: int = 150
    alphas: str = "0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1"


QUICK = Sizes(
    train_videos=48,
    val_videos=16,
    ucf_per_class=2,
    msrvtt_videos=16,
    labeled=16,
    teacher_images=600,
    teacher_steps=25,
    student_steps=6,
    alphas="0,0.5,1",
)


class StageFailed(Exception):
    """A command of the demo exited with an error (which it printed): ``command`` as echoed, and its exit code."""

    def __init__(self, command: str, code: int) -> None:
        super().__init__(command, code)
        self.command, self.code = command, code


def _run(args: list, module: bool = True) -> None:
    """Run a CLI of the project as a user would (``python -m ...``), echoing the command."""
    cmd = [str(c) for c in ([sys.executable, "-m", *args] if module else args)]
    shown = " ".join(["python", *cmd[1:]])
    print("$ " + shown, flush=True)
    code = subprocess.run(cmd).returncode
    if code != 0:
        raise StageFailed(shown, code)


def make_world(root: Path, sizes: Sizes) -> None:
    from demo import world  # numpy rendering: only needed when the world is made

    done = root / "world" / "done.json"
    if done.exists():
        print(f"[1/5] synthetic world: reusing {done.parent}")
        return
    # a world without done.json was cut short: made again from scratch (it is seeded), with the temporaries of its
    # videos and any file a later version of the demo no longer writes
    shutil.rmtree(root / "world", ignore_errors=True)
    start = time.perf_counter()
    print(
        f"[1/5] generating the synthetic world in {root / 'world'}: {sizes.train_videos} training and "
        f"{sizes.val_videos} validation clips, UCF101- and MSR-VTT-layout benchmarks",
        flush=True,
    )
    world.write_webvid(root / "world" / "train", sizes.train_videos, seed=1)
    world.write_webvid(root / "world" / "val", sizes.val_videos, seed=2)
    world.write_ucf101(root / "world" / "bench" / "ucf101", sizes.ucf_per_class, seed=3)
    world.write_msrvtt(root / "world" / "bench" / "msrvtt", sizes.msrvtt_videos, seed=4)
    atomic_write_bytes(done, json_bytes({"sizes": sizes.__dict__, "seconds": round(time.perf_counter() - start, 1)}))


def make_teacher(root: Path, sizes: Sizes) -> Path:
    from demo.teacher import pretrain_teacher

    path = root / "teacher.pt"
    if path.exists():
        print(f"[2/5] teacher: reusing {path}")
        return path
    print(
        f"[2/5] pre-training the tiny CLIP teacher on {sizes.teacher_images} still images "
        f"({sizes.teacher_steps} steps)",
        flush=True,
    )
    stats = pretrain_teacher(MODEL, path, images=sizes.teacher_images, steps=sizes.teacher_steps)
    print(f"      contrastive loss {stats['first_loss']:.2f} -> {stats['last_loss']:.2f} in {stats['seconds']} s")
    return path


def make_shards(root: Path, sizes: Sizes) -> None:
    print("[3/5] sharding with pipeline.shard (complete shards are kept) and drawing the labeled subset", flush=True)
    for split in ("train", "val"):
        _run(
            [
                "pipeline.shard",
                "--src",
                root / "world" / split / "webvid.csv",
                "--out",
                root / "shards" / split,
                "--samples_per_shard",
                50,
                "--size",
                96,
                "--workers",
                2,
                "--progress",
                "False",
            ]
        )
    _run(
        [
            "pipeline.subset",
            "--src",
            root / "shards" / "train",
            "--out",
            root / "shards" / "labeled",
            "--n",
            sizes.labeled,
            "--seed",
            0,
            "--samples_per_shard",
            50,
        ]
    )


def train(root: Path, teacher: Path, sizes: Sizes) -> Path:
    run = root / "run"
    print(
        "[4/5] training the student: torchrun, 2 CPU processes (gloo), teacher soft labels on the fly, "
        "W&B offline; a rerun resumes",
        flush=True,
    )
    _run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            2,
            "-m",
            "train.main",
            "--recipe",
            "demo",
            "--model",
            MODEL,
            "--teacher_weights",
            teacher,
            "--labeled",
            root / "shards" / "labeled",
            "--unlabeled",
            root / "shards" / "train",
            "--val",
            root / "shards" / "val",
            "--out",
            run,
            "--steps",
            sizes.student_steps,
            "--val_every",
            max(1, sizes.student_steps // 3),
            "--batch_labeled",
            16,
            "--batch_unlabeled",
            16,
            "--workers",
            1,
            "--resume",
            "auto",
            "--wandb",
            "offline",
            "--progress",
            "False",
        ],
        module=False,
    )
    return run


def evaluate(root: Path, teacher: Path, run: Path, sizes: Sizes) -> list[dict]:
    print("[5/5] zero-shot evaluation of teacher, student and FitCLIP (alpha 0.4), then the alpha sweep", flush=True)
    common = [
        "--model",
        MODEL,
        "--data_root",
        root / "world" / "bench",
        "--datasets",
        ",".join(DATASETS),
        "--cache",
        root / "eval_cache",
        "--workers",
        2,
        "--batch_size",
        32,
    ]
    _run(
        [
            "eval.run",
            *common,
            "--weights",
            f"{teacher},{run / 'best.pt'},{run / 'fitclip.pt'}",
            "--names",
            ",".join(MODELS),
            "--out",
            root / "results",
        ]
    )
    _run(
        [
            "eval.run",
            *common,
            "--alpha_sweep",
            sizes.alphas,
            "--teacher",
            teacher,
            "--student",
            run / "best.pt",
            "--out",
            root / "results_alpha_sweep",
        ]
    )
    return [json.loads(p.read_text()) for p in sorted((root / "results").glob("*/*.json"))]


def result_problems(records: list[dict]) -> list[str]:
    """Problems: each of the demo's models must have been scored on every video of both benchmarks (a benchmark's
    annotation file gone makes eval.run skip it, and the chance check would then check nothing)."""
    found = {(r.get("model"), r.get("dataset")): r for r in records}
    problems = []
    for model in MODELS:
        for dataset in DATASETS:
            r = found.get((model, dataset))
            if r is None:
                problems.append(f"{model} on {dataset}: no result")
            elif not r.get("metrics"):
                problems.append(f"{model} on {dataset}: not scored ({r.get('reason', 'no metrics')})")
            elif r.get("num_found") != r.get("num_expected"):
                problems.append(f"{model} on {dataset}: {r.get('num_found')} of {r.get('num_expected')} videos scored")
    return problems


def chance_check(records: list[dict], factor: float = 2.0) -> list[str]:
    """Problems: each model must reach ``factor`` x chance (UCF101 top-1, MSR-VTT R@5) on the synthetic benchmarks."""
    problems = []
    for r in records:
        m = r.get("metrics") or {}
        if r["dataset"] == "ucf101" and m:
            chance = 100.0 / len(UCF_CLASSES)
            value, name = m["top1"], "top-1"
        elif r["dataset"] == "msrvtt" and m:
            chance = min(100.0, 500.0 / r["num_found"])
            value, name = m["R@5"], "R@5"
        else:
            continue
        if value < factor * chance and chance < 100.0 / factor:
            problems.append(
                f"{r['model']} on {r['dataset']}: {name} {value:.1f} is below {factor:g}x chance ({chance:.1f})"
            )
    return problems


def size_problems(root: Path, sizes: Sizes) -> list[str]:
    """A line if ROOT holds a world made at other sizes: every stage after it would reuse that world (and the
    subset of another size would fail), so a full run after --quick needs a folder of its own."""
    done = root / "world" / "done.json"
    if not done.is_file():
        return []
    made = json.loads(done.read_text()).get("sizes")
    if made == sizes.__dict__:
        return []
    named = {
        json.dumps(QUICK.__dict__, sort_keys=True): "--quick True",
        json.dumps(Sizes().__dict__, sort_keys=True): "the full sizes",
    }
    was = named.get(json.dumps(made, sort_keys=True), "other sizes")
    now = named[json.dumps(sizes.__dict__, sort_keys=True)]
    return [f"--out {root} holds a demo made with {was}, and this run asks for {now}: use another --out, or remove it"]


def main(out: str = "demo_output", quick: bool = False) -> None:
    """Run the demo into OUT.

    Args:
        out: folder for everything the demo makes (reused by the next run).
        quick: a reduced demo (fewer videos and steps) through the same code path; numbers are then not meaningful.
    """
    # resolved: the same folder however it is spelled, and no relative path that reads as a URL scheme (c:1/...)
    root = Path(str(out)).resolve()
    problems = switch_problems({"quick": quick}) + folder_problems({"out": root})
    if "," in str(root):  # eval.run takes the models' weights files as one comma list
        problems.append(f"--out {root}: the demo hands its files to eval.run in comma lists; use a path without commas")
    sizes = QUICK if quick is True else Sizes()
    if not problems:
        problems += size_problems(root, sizes)
    refuse(problems)
    root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        make_world(root, sizes)
        teacher = make_teacher(root, sizes)
        make_shards(root, sizes)
        run = train(root, teacher, sizes)
        records = evaluate(root, teacher, run, sizes)
    except StageFailed as e:  # its own error line is above: no traceback of ours after it
        sys.exit(
            f"error: the demo stopped: `{e.command}` exited with {e.code} (its message is above). Finished stages "
            "are reused when you run the demo again."
        )
    except KeyboardInterrupt:
        print("\ninterrupted: run the demo again to go on; finished stages are reused", file=sys.stderr)
        sys.exit(130)
    minutes = (time.perf_counter() - start) / 60
    print(
        f"\nDemo finished in {minutes:.1f} min. Results: {root / 'results' / 'summary.md'}, "
        f"alpha sweep plot: {root / 'results_alpha_sweep' / 'alpha_sweep.png'}, "
        f"W&B offline run: {run / 'wandb'}, fused model: {run / 'fitclip.pt'}"
    )
    incomplete = result_problems(records)
    if incomplete:  # in the quick form too: a missing result is not a matter of too few steps
        sys.exit(
            "error: the evaluation is incomplete:\n  "
            + "\n  ".join(incomplete)
            + f"\nRemove {root / 'world'} to make the synthetic world again, and rerun the demo."
        )
    problems = chance_check(records)
    if problems and not quick:
        print(
            "\nSOMETHING IS WRONG: the models should beat chance by a wide margin on this world:\n  "
            + "\n  ".join(problems),
            file=sys.stderr,
        )
        sys.exit(1)
    if not problems:
        print("Check: every model beats chance by at least 2x on both synthetic benchmarks.")


def cli() -> None:
    """The installed command (setup.cfg's console_scripts)."""
    fire_main(main, texts=True)


if __name__ == "__main__":
    cli()
