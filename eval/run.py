"""CLI: zero-shot evaluation of one or more CLIP models on the paper's video benchmarks.

    python -m eval.run --suite zero_shot --model ViT-B-16-quickgelu \\
        --weights openai,runs/x/best.pt,runs/x/fitclip.pt --names CLIP,Student,FitCLIP \\
        --data_root data --out results/

Writes ``OUT/<name>/<dataset>.json`` per model and dataset, and ``OUT/summary.md``
(the paper's tables). A weights entry may be an open_clip tag (``openai``), a
state dict or checkpoint file, or ``fuse:TEACHER:STUDENT:ALPHA``.
``--alpha_sweep 0,0.1,...,1 --teacher W --student S`` evaluates fused models
across alpha and plots each metric against it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from eval import report
from eval.datasets import DATASETS, AnnotationsMissing
from eval.datasets.base import CLASSIFICATION, EvalDataset
from eval.features import (
    PRECISIONS,
    class_embeddings,
    eval_autocast,
    eval_precision,
    text_embeddings,
    video_embeddings,
)
from eval.frame_cache import CacheSettings, FrameCache, build_cache
from eval.metrics import classification_metrics, retrieval_metrics
from eval.prompts import class_prompts
from eval.suites import SUITES
from pipeline.cli import (
    DISK_ERRNOS,
    comma_list,
    count_problems,
    error_line,
    fire_main,
    folder_problems,
    raised_problems,
    refuse,
    switch_problems,
    write_failed,
)
from pipeline.folder_lock import LOCK_NAME, lock_folder
from pipeline.time_limit import decode_timeout_problems, limit_of
from pipeline.writer import remove_temporaries
from train.distributed import device_choice, init_distributed
from train.fuse import fuse_state_dicts, trained_with
from train.model import (
    EMPTY_STUDENT,
    EMPTY_WEIGHTS,
    WeightsError,
    check_weights,
    config_image_size,
    create_clip,
    device_problems,
    image_size,
    is_weights_file,
    load_state_dict,
    register_model,
    tag_unavailable,
    tokenizer_for,
)
from train.monitor import online_problems


@dataclass(frozen=True)
class EvalConfig:
    """Settings shared by every model and dataset of a run (stored in every result file)."""

    model: str
    data_root: str
    out: str
    frames: int = 4
    batch_size: int = 64
    device: str = "auto"
    workers: int = 4
    renormalize_video: bool = True
    didemo_split: str = "test"
    didemo_merge_same_video: bool = True  # one candidate per video file (see eval.datasets.didemo)
    cache: str = ""
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 elsewhere), bf16 or fp32 (see eval.features.eval_precision)
    decode_timeout: float = 120.0  # seconds one video's decoding may take (0: no limit); past it, counted missing


# what OUT holds besides the models' folders (OUT/<name>/): a model of one of these names would collide with it
RESERVED_NAMES = frozenset({report.SUMMARY_NAME, "cache", "wandb", "alpha_sweep.png", LOCK_NAME})
CACHE_MIN_SIZE = 224  # cached frames' shorter side is at least this, so every 224-px model shares one cache


def default_name(weights: str) -> str:
    """A display name (and folder name) for a weights entry given without --names: runs/x/best.pt -> runs_x_best."""
    stem = (
        weights[: -len(Path(weights).suffix)]
        if Path(weights).suffix in (".pt", ".pth", ".bin", ".safetensors")
        else weights
    )
    return re.sub(r"[^A-Za-z0-9.=+-]+", "_", stem).strip("._") or "model"


def parse_alphas(alpha_sweep) -> list[float]:
    """--alpha_sweep as fire hands it over (a number, a tuple or a text) -> the alphas; a ValueError naming the flag
    for an item that is not a number in [0, 1], or for one given twice."""
    alphas = []
    for item in comma_list(alpha_sweep):
        try:
            alpha = float(item)
        except ValueError:
            alpha = float("nan")
        if not 0 <= alpha <= 1:
            raise ValueError(f"--alpha_sweep takes a comma list of numbers from 0 to 1 (e.g. 0,0.4,1), got {item!r}")
        alphas.append(alpha)
    names = [f"{a:g}" for a in alphas]  # as the models are named (alpha=A) and their folders
    twice = sorted({n for n in names if names.count(n) > 1}, key=float)
    if twice:
        raise ValueError(
            f"--alpha_sweep names {', '.join(twice)} twice (each alpha is one model, named alpha=A as printed to 6 "
            "digits): give each once"
        )
    return alphas


def parse_fuse(weights: str) -> tuple[str, str, float]:
    """``fuse:TEACHER:STUDENT:ALPHA`` -> (teacher, student, alpha); a ValueError that shows the form otherwise.

    A path may hold a colon (``runs/2026-11-27T10:00/best.pt``): TEACHER and STUDENT are split at the first colon
    after which STUDENT is a file that exists (it must be a weights file), else at the first colon."""
    parts = weights[len("fuse:") :].rsplit(":", 1)
    pair = parts[0]
    splits = [(pair[:i], pair[i + 1 :]) for i, c in enumerate(pair) if c == ":"]
    teacher, student = next((s for s in splits if Path(s[1]).is_file()), splits[0] if splits else (pair, ""))
    try:
        alpha = float(parts[1]) if len(parts) == 2 else float("nan")
    except ValueError:
        alpha = float("nan")
    for role, given in (("TEACHER", teacher), ("STUDENT", student)):
        if alpha == alpha and not given:  # an ALPHA, so the form is right but a part is empty: say which
            advice = EMPTY_WEIGHTS if role == "TEACHER" else EMPTY_STUDENT
            raise ValueError(f"--weights {weights}: its {role} is empty; {advice}")
    if not (teacher and student and 0.0 <= alpha <= 1.0):
        raise ValueError(
            f"--weights {weights}: write fuse:TEACHER:STUDENT:ALPHA with ALPHA in [0, 1] "
            "(e.g. fuse:openai:runs/fitclip/best.pt:0.4)"
        )
    return teacher, student, alpha


def weights_id(weights: str) -> str:
    """What a weights entry names, to tell two models apart across runs: a file's SHA-256 (the same file however
    its path is spelled, and not the file a training run later wrote at the same path), a fused entry's parts and
    alpha, or the tag as given."""
    if weights.startswith("fuse:"):
        teacher, student, alpha = parse_fuse(weights)
        return f"fuse:{weights_id(teacher)}:{weights_id(student)}:{alpha:g}"
    if is_weights_file(weights):
        path = Path(weights).resolve()
        stat = path.stat()
        return "sha256:" + _file_sha256(str(path), stat.st_size, stat.st_mtime_ns)
    return weights


@functools.lru_cache(maxsize=64)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    """The SHA-256 of the file at ``path``, once per run for each size and modification time it has (a ViT-B/16
    checkpoint takes about a second)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_entry(model: str, weights: str) -> None:
    """Fail before the frame cache is built (minutes to hours) on a weights entry that cannot load, or that is empty
    (open_clip would build a model of random weights, different on every run)."""
    if not weights.strip():
        raise ValueError(f"--weights is empty; {EMPTY_WEIGHTS}")
    if weights.startswith("fuse:"):
        teacher, student, _ = parse_fuse(weights)
        _check_fits(model, teacher)
        if not is_weights_file(student):
            raise ValueError(f"--weights {weights}: the student ({student}) must be a weights file")
        _check_fits(model, student)
    else:
        teacher = weights
        _check_fits(model, weights)
    if teacher and not is_weights_file(teacher):  # a tag: its weights fetched or cached, before the decoding
        problem = tag_unavailable(model, teacher)
        if problem:
            raise WeightsError(problem)


def _check_fits(model: str, weights: str) -> None:
    """``check_weights``, whose refusal of a train.main checkpoint (best.pt, latest.pt) that does not fit ``model``
    also names the --model its config records: the README's examples leave --model at its default, ViT-B/16."""
    try:
        check_weights(model, weights)
    except WeightsError as e:
        recorded = trained_with(weights).get("model") if is_weights_file(weights) else None
        if recorded and recorded != model:
            raise WeightsError(f"{e}; its checkpoint was trained with --model {recorded}") from None
        raise


def split_file_problems(entries: list[str]) -> list[str]:
    """A line for each file whose name holds a comma that --weights split into entries (``runs/a,b.pt`` gave
    ``runs/a`` and ``b.pt``, each "not found"): how to pass it."""
    return [
        f"--weights is split at commas, and {joined} is a file whose name holds one: link it under a name without "
        f"(ln -s '{joined}' weights.pt) and give that"
        for i in range(len(entries))
        for j in range(i + 2, len(entries) + 1)
        if Path(joined := ",".join(entries[i:j])).is_file()
    ]


def weights_problems(model: str, entries: list[str]) -> list[str]:
    """A line for ``--model`` if it cannot be registered, else one for each weights entry that cannot load
    (:func:`check_entry`): before the frame cache is built."""
    return raised_problems(register_model, model) or [
        line for entry in entries for line in raised_problems(functools.partial(check_entry, model), entry)
    ]


def load_model(model: str, weights: str, device: torch.device) -> torch.nn.Module:
    """An eval-mode CLIP: a tag, a file, or ``fuse:TEACHER:STUDENT:ALPHA``."""
    if weights.startswith("fuse:"):
        teacher, student, alpha = parse_fuse(weights)
        teacher_sd = create_clip(model, teacher).state_dict()
        fused = fuse_state_dicts(teacher_sd, load_state_dict(student), alpha)
        clip = create_clip(model, "")
        clip.load_state_dict(fused)
        return clip.to(device).eval()
    return create_clip(model, weights, device).eval()


def model_input_size(model: str) -> int:
    """The input resolution of ``--model`` from its open_clip config (every built-in config states it), so the
    frame cache is sized before any model is built."""
    size = config_image_size(model)
    if size is None:
        raise ValueError(f"--model {model}: its config has no vision_cfg.image_size; add the input size there")
    return size


def cache_settings(model: str, frames: int) -> CacheSettings:
    """Frames cached at the model's input size or more: a 336-px model must not get upsampled 224-px frames."""
    return CacheSettings(frames=frames, size=max(CACHE_MIN_SIZE, model_input_size(model)))


def load_datasets(names: list[str], cfg: EvalConfig, roots: dict[str, str]) -> tuple[list[EvalDataset], list[dict]]:
    """Parsed datasets, and a 'skipped' record for each whose annotation files are absent."""
    loaded, skipped = [], []
    for name in names:
        root = Path(roots.get(name) or Path(cfg.data_root) / name)
        kwargs = (
            {"split": cfg.didemo_split, "merge_same_video": cfg.didemo_merge_same_video} if name == "didemo" else {}
        )
        try:
            loaded.append(DATASETS[name](root, **kwargs))
        except AnnotationsMissing as e:
            skipped.append({"dataset": name, "skipped": True, "reason": str(e), "path": e.path})
            print(f"skipping {name}: {e}", file=sys.stderr)
        except (ValueError, OSError) as e:  # a malformed or unreadable annotation file (its parser names it)
            raise SystemExit(
                f"error: {name}: {e}; fix or replace the annotation file, or leave {name} out with --datasets"
            ) from e
    return loaded, skipped


def evaluate(clip, tokenizer, dataset: EvalDataset, cache: FrameCache, cfg: EvalConfig, device: torch.device) -> dict:
    """Metrics of one model on one dataset; missing videos are listed and left out, never zero-filled."""
    autocast = eval_autocast(device, cfg.precision)
    found = [item for item in dataset.items if item.id in cache.found]
    videos = video_embeddings(
        clip,
        cache,
        [i.id for i in found],
        cfg.frames,
        image_size(clip),
        cfg.batch_size,
        device,
        cfg.renormalize_video,
        autocast,
    )
    video = torch.stack([videos[i.id] for i in found]) if found else torch.zeros(0, 1)  # (N, D)
    if not found:
        metrics = {}
    elif dataset.task == CLASSIFICATION:
        prompts = class_prompts(dataset.classes, dataset.templates)
        classes = class_embeddings(clip, tokenizer, prompts, cfg.batch_size, device, autocast)  # (C, D)
        labels = torch.tensor([i.label for i in found])
        metrics = classification_metrics(video @ classes.T, labels)
    else:
        text = text_embeddings(clip, tokenizer, [i.text for i in found], cfg.batch_size, device, autocast)
        metrics = retrieval_metrics(text @ video.T)  # queries: texts; candidates: the found videos
    missing = [i.id for i in dataset.items if i.id not in cache.found]
    return {
        "dataset": dataset.name,
        "task": dataset.task,
        "metrics": metrics,
        "num_expected": len(dataset.items),
        "num_found": len(found),
        "num_missing": len(missing),
        "missing": missing,
        "missing_reasons": {k: cache.missing.get(k, "") for k in missing},
        "sources": list(dataset.sources),
        "precision": eval_precision(device, cfg.precision),  # as run: auto's choice on this device
    }


def run(
    cfg: EvalConfig,
    models: list[tuple[str, str]],
    datasets: list[EvalDataset],
    skipped: list[dict],
    strict: bool,
    progress: bool = True,
) -> list[dict]:
    """Evaluate every model on every dataset; write the records and the summary. Returns the records. ``progress``:
    the frame cache's progress bar."""
    device = init_distributed(cfg.device).device  # the trainer's device choice, with its clear CUDA errors
    cache_root = Path(cfg.cache or Path(cfg.out) / "cache")
    settings = cache_settings(cfg.model, cfg.frames)
    caches = {
        d.name: build_cache(d, cache_root, settings, cfg.workers, progress, decode_timeout=cfg.decode_timeout)
        for d in datasets
    }
    for d in datasets:
        if strict and caches[d.name].missing:
            some = list(caches[d.name].missing.items())[:3]
            raise SystemExit(
                f"error: --strict and {len(caches[d.name].missing)} {d.name} video(s) are missing or "
                f"undecodable, e.g. {some}"
            )
    # a dataset of which no video was found is a wrong folder more often than a broken one: say where it looked
    empty = [d for d in datasets if d.items and not caches[d.name].found]
    for d in empty:
        reasons = caches[d.name].missing
        timed_out = [item for item in d.items if limit_of(reasons.get(item.id, "")) is not None]  # as the cache tells
        hints = []
        if len(timed_out) < len(d.items):  # some not found (or not decodable): a wrong folder, most often
            hints.append(
                f"check --data_root or --{d.name}_root (README: Zero-shot evaluation, the layout under --data_root)"
            )
        if timed_out:  # found, and stopped: the folder may well be right
            hints.append(
                f"{len(timed_out)} ran past --decode_timeout: give it more seconds (0 for no limit), or fewer "
                "--workers on a busy machine"
            )
        example = timed_out[0] if timed_out else d.items[0]
        print(
            f"warning: {d.name}: none of its {len(d.items)} videos was found or could be decoded (e.g. "
            f"{example.video}: {reasons.get(example.id, '?')}); {'; '.join(hints)}",
            file=sys.stderr,
        )
    if empty and len(empty) == len(datasets):
        raise SystemExit(f"error: no video of {', '.join(d.name for d in empty)} was found or decoded (see above)")
    tokenizer = tokenizer_for(cfg.model)
    records = []
    for name, weights in models:
        clip = load_model(cfg.model, weights, device)
        for d in datasets:
            start = time.perf_counter()
            record = evaluate(clip, tokenizer, d, caches[d.name], cfg, device)
            record.update(
                model=name,
                weights=weights,
                weights_id=weights_id(weights),
                config=asdict(cfg),
                frame_cache=asdict(settings),
                code_version=report.code_version(),
                seconds=round(time.perf_counter() - start, 2),
            )
            report.write_result(cfg.out, name, d.name, record)
            records.append(record)
            # rounded as summary.md rounds them (half up), so the console and the table agree
            shown = ", ".join(f"{k} {report.format_value(v, k)}" for k, v in record["metrics"].items() if k != "num")
            print(f"{name} / {d.name}: {shown} ({record['num_found']}/{record['num_expected']} videos)")
        del clip
    for name, _ in models:
        for s in skipped:
            report.write_result(cfg.out, name, s["dataset"], {**s, "model": name})
    return records


@contextlib.contextmanager
def out_lock(out: Path):
    """Hold ``OUT/.lock`` while this run writes its records, summary and plot: two runs into one OUT would replace
    each other's records and tables. Under it, the temporaries a killed run left beside them are removed."""
    out.mkdir(parents=True, exist_ok=True)
    handle = lock_folder(out)
    if handle is None:
        held = out / LOCK_NAME
        raise SystemExit(f"error: another run is writing {out} (it holds {held}): wait for it or give another --out")
    with handle:
        # every model's folder, not only this run's: a killed run into OUT may have scored other names
        for folder in (out, *(path for path in out.iterdir() if path.is_dir() and path.name not in RESERVED_NAMES)):
            remove_temporaries(folder)
        yield


def mixed_row_problems(out: str, cfg: EvalConfig, models: list[tuple[str, str]], datasets: list[str]) -> list[str]:
    """A line for each name of this run whose records in OUT, on datasets this run does not score again, come from
    other weights or settings: summary.md's row for the name would mix two models' numbers (and its Models table
    name one of them)."""
    given = dict(models)
    precision = eval_precision(torch.device(device_choice(cfg.device)), cfg.precision)  # what this run will run
    others: dict[str, dict[str, str]] = {}  # name -> {dataset: the weights its record names}
    for r in report.load_results(out):
        name = r["model"]
        if name not in given or r.get("skipped") or r["dataset"] in datasets:
            continue
        settings = r.get("config", {})
        # the weights by their content (records from before weights_id: by the entry as given)
        now = (weights_id(given[name]) if "weights_id" in r else given[name], cfg.model, cfg.frames)
        then = (r.get("weights_id", r["weights"]), settings.get("model"), settings.get("frames"))
        if (
            then != now
            or settings.get("renormalize_video") != cfg.renormalize_video
            or r.get("precision", precision) != precision  # what ran (a record from before it: not known)
        ):
            others.setdefault(name, {})[r["dataset"]] = r["weights"]
    return [
        f"{Path(out) / name} holds {name}'s {', '.join(sorted(found))} results, scored with "
        f"{' and '.join(sorted(set(found.values())))} (as it was then) or other settings; this run scores {name} "
        f"with {given[name]}, and summary.md would mix the two in one row: give another --names, score those "
        "datasets again (--datasets), or delete their files there"
        for name, found in others.items()
    ]


def summarise(out: str, names: list[str] = ()) -> Path | None:
    """OUT/summary.md from every record in OUT (None: there is none), at the end of a run, however it ends: it
    removed the old tables at its start. The models of ``names`` (this run's, in its --names order) come first, in
    that order, then any others in OUT by name."""
    rank = {name: i for i, name in enumerate(names)}
    results = sorted(report.load_results(out), key=lambda r: rank.get(r["model"], len(rank)))  # stable: path order
    return report.write_summary(out, results) if results else None


def main(
    suite: str = "zero_shot",
    model: str = "ViT-B-16-quickgelu",
    weights: str = "openai",
    names: str = "",
    data_root: str = "data",
    out: str = "results",
    datasets: str = "",
    batch_size: int = 64,
    device: str = "auto",
    workers: int = 4,
    frames: int = 4,
    strict: bool = False,
    alpha_sweep: str = "",
    teacher: str = "openai",
    student: str = "",
    cache: str = "",
    didemo_split: str = "test",
    didemo_merge_same_video: bool = True,
    renormalize_video: bool = True,
    precision: str = "auto",
    decode_timeout: float = 120.0,
    progress: bool = True,
    wandb: str = "off",
    ucf101_root: str = "",
    moments_root: str = "",
    msrvtt_root: str = "",
    youcook2_root: str = "",
    didemo_root: str = "",
) -> None:
    """Zero-shot evaluation on UCF101, Moments in Time, MSR-VTT, YouCook2 and DiDeMo.

    Args:
        suite: which benchmarks: zero_shot (all five), action (ucf101, moments) or retrieval (msrvtt, youcook2,
            didemo).
        model: open_clip model name or model-config JSON (ViT-B-16-quickgelu for OpenAI's ViT-B/16).
        weights: comma list: open_clip tags, state dict / checkpoint files, or fuse:TEACHER:STUDENT:ALPHA.
        names: comma list of display names (and OUT folders), one per weights entry; by default each entry without
            its file suffix, with characters other than letters, digits and .=+- made _ (runs/x/best.pt gives
            runs_x_best).
        data_root: folder holding ucf101/ moments/ msrvtt/ youcook2/ didemo/ in their official layouts.
        out: results folder: OUT/<name>/<dataset>.json, OUT/summary.md, OUT/cache/ (decoded frames).
        datasets: comma list of datasets to run instead of the suite's (e.g. ucf101,msrvtt).
        batch_size: videos (or texts) per forward pass.
        device: auto, cuda or cpu.
        workers: processes decoding videos into the frame cache.
        frames: frames per video (segment midpoints).
        strict: fail if any video is missing or undecodable (default: count, list and leave them out).
        alpha_sweep: comma list of alphas in [0, 1]: evaluate fuse:TEACHER:STUDENT:alpha for each (named alpha=A)
            instead of --weights and --names, and plot metrics vs alpha.
        teacher: the teacher's weights for --alpha_sweep.
        student: the student's weights for --alpha_sweep.
        cache: frame cache folder (default OUT/cache); decoded once, reused by every model and rerun.
        didemo_split: test (test_data.json) or val (val_data.json, what the authors' code used).
        didemo_merge_same_video: one item per video file (1,004 test videos, as the authors' code keys items by
            file); False keeps the 33 files named twice in test_data.json as two candidates each (1,037).
        renormalize_video: L2-normalise the mean of the frame embeddings.
        precision: auto (bf16 autocast on a GPU, fp32 on the CPU), bf16 or fp32 (as the authors evaluated).
        decode_timeout: seconds one video's decoding may take (0 for no limit, else at most a day); past it the
            video is counted missing, and a later run with a longer limit decodes it again.
        progress: a progress bar while videos are decoded into the frame cache.
        wandb: off, offline or online: log the results table (and the alpha-sweep plot) to W&B, run in OUT/wandb.
        ucf101_root: UCF101 folder if not DATA_ROOT/ucf101 (and likewise for the others).
        moments_root: Moments in Time folder.
        msrvtt_root: MSR-VTT folder.
        youcook2_root: YouCook2 folder.
        didemo_root: DiDeMo folder.
    """
    # every problem in one line, as the other CLIs give them: the flags', the model config's and each weights entry's
    problems = [] if suite in SUITES else [f"--suite must be one of {', '.join(SUITES)}, got {suite!r}"]
    chosen = comma_list(datasets) or list(SUITES.get(suite, ()))
    unknown = [d for d in chosen if d not in DATASETS]
    if unknown:
        problems.append(f"unknown dataset(s) {unknown}; known: {', '.join(DATASETS)}")
    try:
        alphas = parse_alphas(alpha_sweep)
    except ValueError as e:
        alphas, problems = [], [*problems, str(e)]
    models = []
    if comma_list(alpha_sweep):  # a sweep, even one refused above: --weights (its default too) plays no part
        if not student:
            problems.append("--alpha_sweep needs --student (and --teacher, default openai)")
        if not str(teacher).strip():
            problems.append(f"--alpha_sweep: --teacher is empty; {EMPTY_WEIGHTS}")
        if student and str(teacher).strip():  # else one line above, not one per alpha
            models = [(f"alpha={a:g}", f"fuse:{teacher}:{student}:{a}") for a in alphas]
    else:
        entries = comma_list(weights)
        problems += split_file_problems(entries)
        labels = comma_list(names) or [default_name(e) for e in entries]
        if len(labels) != len(entries):
            problems.append(f"--names has {len(labels)} entries but --weights has {len(entries)}")
        models = list(zip(labels, entries, strict=False))
        if not entries:
            problems.append("--weights names no model: give one or more entries (e.g. openai,runs/x/best.pt)")
        twice = sorted({n for n in labels if labels.count(n) > 1})
        if twice and len(labels) == len(entries):
            problems.append(
                f"two models would be named {', '.join(twice)}, and each model's records go to OUT/<name>: give "
                "distinct --names, one per weights entry"
            )
        taken = sorted(set(labels) & RESERVED_NAMES)
        if taken:
            problems.append(f"--names {taken}: OUT holds files and folders of that name; choose other names")
        bad = [n for n in labels if not report.is_path_part(n)]
        if bad:
            problems.append(f"--names {bad}: a name becomes a folder of OUT, so no slashes or dots-only names")
    if wandb not in ("off", "offline", "online"):
        problems.append(f"--wandb must be off, offline or online, got {wandb!r}")
    problems += online_problems(wandb)  # wandb.init would refuse it after every model was scored
    if didemo_split not in ("test", "val"):
        problems.append(f"--didemo_split must be test or val, got {didemo_split!r}")
    if precision not in PRECISIONS:
        problems.append(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    switches = {"strict": strict, "didemo_merge_same_video": didemo_merge_same_video, "progress": progress}
    problems += switch_problems(switches | {"renormalize_video": renormalize_video})
    problems += count_problems({"batch_size": (batch_size, 1), "workers": (workers, 1), "frames": (frames, 1)})
    problems += decode_timeout_problems(decode_timeout) + device_problems(device)
    # cache "" (OUT/cache) is the folder "." here: no line; a read-only cache serves the frames it holds up to date
    problems += folder_problems({"out": out}) + folder_problems({"cache": cache}, writable=False)
    problems += weights_problems(str(model), [entry for _, entry in models])
    refuse(problems)
    cfg = EvalConfig(
        model=str(model),
        data_root=str(data_root),
        out=str(out),
        frames=int(frames),
        batch_size=int(batch_size),
        device=str(device),
        workers=int(workers),
        renormalize_video=bool(renormalize_video),
        didemo_split=didemo_split,
        didemo_merge_same_video=bool(didemo_merge_same_video),
        cache=str(cache),
        precision=str(precision),
        decode_timeout=float(decode_timeout),
    )
    roots = {
        "ucf101": ucf101_root,
        "moments": moments_root,
        "msrvtt": msrvtt_root,
        "youcook2": youcook2_root,
        "didemo": didemo_root,
    }
    loaded, skipped = load_datasets(chosen, cfg, {k: str(v) for k, v in roots.items() if v})
    if not loaded:
        sys.exit(f"error: no dataset found under {data_root}: {[s['path'] for s in skipped]}")
    with out_lock(Path(cfg.out)):
        refuse(mixed_row_problems(cfg.out, cfg, models, chosen))  # read under the lock: no other run writes OUT now
        # the tables are rebuilt from every record at the end; until then an old summary.md would sit beside records
        # this run has replaced (and stay so if it is stopped): it goes now
        (Path(cfg.out) / report.SUMMARY_NAME).unlink(missing_ok=True)
        try:
            records = run(cfg, models, loaded, skipped, bool(strict), bool(progress))
        except (ValueError, FileNotFoundError, RuntimeError) as e:  # RuntimeError: e.g. --device cuda without CUDA
            sys.exit(f"error: {e}")
        except OSError as e:  # a full disk, a file-size limit (a video that cannot be read is a per-video failure)
            if e.errno not in DISK_ERRNOS:
                raise
            where = e.filename or f"{cfg.out} (or the frame cache, {cfg.cache or Path(cfg.out) / 'cache'})"
            sys.exit(
                f"error: {write_failed(e, where)}; the records scored so far are kept, and the frame cache keeps the "
                "datasets it had finished decoding"
            )
        except KeyboardInterrupt:  # Ctrl-C: a line that says what is kept, not a traceback
            sys.exit(
                f"interrupted: the records scored so far are in {cfg.out} (with their tables in {report.SUMMARY_NAME}, "
                "if any); the frame cache keeps the datasets it had finished decoding, so the same command decodes "
                "only the others"
            )
        finally:  # also when the run stops early (an error, --strict's refusal, Ctrl-C): the records written so far
            summary = summarise(cfg.out, [name for name, _ in models])
        if summary is not None:
            print(summary.read_text())
        png = None
        if alphas:
            points = []
            for r in records:
                metric = report.headline_metric(r["dataset"])
                if r["metrics"] and metric:
                    alpha = float(r["weights"].rsplit(":", 1)[1])
                    points.append(
                        {"alpha": alpha, "dataset": r["dataset"], "metric": metric, "value": r["metrics"][metric]}
                    )
            png = report.plot_alpha_sweep(points, Path(cfg.out) / "alpha_sweep.png")
            print(f"alpha sweep plot: {png}")
    if wandb != "off":
        try:
            log_to_wandb(records, cfg, wandb, png)
        except Exception as e:  # wandb's CommError after its init_timeout: no network on this machine, say
            raise SystemExit(
                f"error: --wandb {wandb}: logging to W&B failed ({error_line(e)}); the results are in "
                f"{cfg.out} (summary.md); rerun with --wandb offline to keep a W&B run to upload later"
            ) from None


def log_to_wandb(records: list[dict], cfg: EvalConfig, mode: str, png: Path | None) -> None:
    """One W&B run: a table of every (model, dataset, metric) and the alpha-sweep plot."""
    import wandb

    run = wandb.init(
        project="fitclip-eval",
        dir=cfg.out,
        mode=mode,
        config=asdict(cfg),
        settings=wandb.Settings(save_code=False, console="off"),
    )
    table = wandb.Table(columns=["model", "dataset", "metric", "value", "found", "expected"])
    for r in records:
        for metric, value in r["metrics"].items():
            table.add_data(r["model"], r["dataset"], metric, float(value), r["num_found"], r["num_expected"])
    payload = {"results": table}
    if png is not None:
        payload["alpha_sweep"] = wandb.Image(str(png))
    run.log(payload)
    run.finish()


def cli() -> None:
    """The installed command (setup.cfg's console_scripts)."""
    fire_main(main, texts=True, lists=("weights", "names", "datasets", "alpha_sweep"))


if __name__ == "__main__":
    cli()
