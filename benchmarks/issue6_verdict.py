"""Issue 6's targets, checked against what ``benchmarks/gpu_step.sh`` wrote, and the defaults they suggest.

    python -m benchmarks.issue6_verdict --out DIR

Reads whichever of ``DIR/step_variants_<device>.json`` (step part), ``DIR/tune/step_variants_<device>.json``
(tune part: more step variants, judged with the step part's), ``DIR/numerics.json`` (numerics part),
``DIR/kernels.json`` (kernels part), ``DIR/epilogue.json`` (epilogue part), ``DIR/loader_bench.json`` (loader
part) and ``DIR/memory/step_variants_<device>.json`` (memory part) exist, and prints one line per target: the
128+128 step's MFU (55% of the measured bf16 peak) and its speed-up over the naive step (1.7x), the optimised step's
loss and gradients against the plain fp32 step's, the loader's margin over the step's demand with at most 6 workers
(2x) in each place the crop can run, and which activation checkpointing fits 256+256 under the memory part's cap
(``--memory_gib``, 78 GiB in gpu_step.sh), fastest first; and what the kernels and epilogue parts measured. It then
names the settings the figures favour for the trainer's GPU defaults (the step's levers in ``LEVERS``, never one
whose numerics check failed; ``--augment_on``; ``--grad_checkpointing``). With ``--levers`` (gpu_step.sh passes its
LEVERS) it ends with the device call to make next on the warm machine, if any (``next_call_lines``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from benchmarks.args import checkpointed_blocks
from pipeline.cli import fire_main
from train.gaps import describe_idle

MFU_TARGET = 0.55
SPEEDUP_TARGET = 1.7
LOADER_MARGIN = 2.0
MAX_WORKERS = 6
GAIN = 1.02  # a step lever becomes the trainer's GPU default if it beats timing noise by this much
# the numerics target: the optimised step against the plain fp32 step on the same inputs (benchmarks.gpu_numerics)
LOSS_TOLERANCE = 1e-2  # relative loss difference
# the kinds of kernels (train.profiling) that do a step's FLOPs; the patch embedding's convolution is one (a matrix
# product with --linear_patch_embed)
CORE_KINDS = ("matmul", "convolution", "attention")
LOSSES = ("first_loss", "last_loss")  # a step_variants row's losses, compared between variants (wrong_losses)
COSINE_MIN = 0.99  # cosine similarity of the student's gradients
NORM_TOLERANCE = 0.05  # |gradient norm ratio - 1|
LEVERS = {  # step_variants option: what it is, and the trainer flag that turns it on
    "qkv": ("packed attention", "--packed_qkv True"),
    "patch": ("linear patch embedding", "--linear_patch_embed True"),
    "cls": ("class-token last block", "--cls_last_block True"),
    "split": ("q, k and v from three products", "--split_qkv True"),
    "tstream": ("the teacher beside the student's forward", "--teacher_stream beside"),
    "tahead": ("the next step's teacher beside the backward", "--teacher_stream ahead"),
    "cudnn": ("cuDNN attention first", "--attention_kernel cudnn"),
    "flash": ("flash attention first", "--attention_kernel flash"),
    "efficient": ("memory-efficient attention first", "--attention_kernel efficient"),
    "math": ("math attention first", "--attention_kernel math"),
    "autotune": ("max-autotune compile", "--compile_mode max-autotune-no-cudagraphs"),
    "tma": ("persistent TMA matmul templates", "--persistent_tma_matmul True"),
    "cdt": ("coordinate-descent tuning of the Triton kernels", "--coordinate_descent_tuning True"),
    # the one lever that turns a default off: captions padded to the full context length, as before --trim_text
    "fullpad": ("captions at the full context length", "--trim_text False"),
}
REQUIRES = {"tma": "autotune"}  # a lever step_variants times only beside another: judged with it, against neither
# the trainer's GPU default step (gpu_step.sh's DEFAULT): the three layer levers are on by default since the H200
# run of 2026-11-28 (1.30x together)
DEFAULT = "ours+compile+cteacher+qkv+patch+cls"
MODE_SOURCES = {  # per --augment_on mode, the step variants' option that feeds the step as that mode (None: neither)
    "loader": None,
    "device": "devaug",
    "device_jpeg": "devjpeg",
}


def _ok(rows: list[dict]) -> dict[str, dict]:
    return {r["variant"]: r for r in rows if r.get("status") == "ok"}


def _mark(passed: bool) -> str:
    return "MET" if passed else "NOT MET"


def step_lines(step: dict, unsafe: frozenset[str] = frozenset(), unchecked: bool = False) -> list[str]:
    rows = _ok(step["rows"])
    trainer = {v: r for v, r in rows.items() if v != "naive"}
    if not trainer:
        return ["step: no variant but naive ran"]
    lines, astray = [], wrong_losses(rows)
    if astray:  # e.g. a missing wait between CUDA streams: fast, and wrong
        ref = loss_reference(rows)
        lines.append(
            f"variants whose loss (first/last step) is off {ref}'s ({_losses(rows[ref])}) by {LOSS_TOLERANCE:g} or "
            "more (relative), left out of the judging (a wrong result?): "
            + ", ".join(f"{v} {_losses(rows[v])}" for v in astray)
        )
        rows = {v: r for v, r in rows.items() if v not in astray}  # nor advised as a lever: the reference stays
        trainer = {v: r for v, r in rows.items() if v != "naive"}
        if not trainer:
            return [*lines, "step: no variant but naive left to judge"]
    best_name, best = max(trainer.items(), key=lambda kv: kv[1]["videos_per_s"])
    mfu = best.get("mfu_measured")
    if mfu is None:
        lines.append(f"MFU: not measured on {step['device']} (no bf16 peak)")
    else:
        lines.append(
            f"MFU at {best['batch']}: {100 * mfu:.1f}% of the measured peak with {best_name} "
            f"(target {100 * MFU_TARGET:.0f}%): {_mark(mfu >= MFU_TARGET)}"
        )
    lines += time_lines(best_name, best)
    naive = rows.get("naive")
    if naive:
        ratio = best["videos_per_s"] / naive["videos_per_s"]
        lines.append(f"speed-up over naive: {ratio:.2f}x (target {SPEEDUP_TARGET}x): {_mark(ratio >= SPEEDUP_TARGET)}")
    else:  # e.g. out of memory: the naive step needed 88.9 GiB at 128+128 on the H200, more than an H100 has
        status = next((r["status"] for r in step["rows"] if r["variant"] == "naive"), None)
        why = f"{status}; it needs an H200 at 128+128" if status else "not run in this call"
        lines.append(f"speed-up over naive: NOT JUDGED (naive: {why})")
    lines += lever_lines(rows, unsafe, unchecked) + prefetch_lines(rows)
    failed = [r["variant"] for r in step["rows"] if r.get("status") != "ok"]
    if failed:
        lines.append(f"variants that failed: {', '.join(failed)} (their errors are in the JSON)")
    return lines


def wrong_losses(rows: dict[str, dict]) -> list[str]:
    """The variants whose first or last step's loss is off the trainer's default step's (or the naive step's) by
    ``LOSS_TOLERANCE`` or more, relative. Every variant starts from the same weights on the same batches, so their
    losses differ by bf16 noise only (first steps 1.5e-3 apart between naive and the default on the H200, last steps
    1.5e-4); more means a variant computes something else. The last step's matters too: ``--teacher_stream ahead``
    runs its first step's teacher beside the student, and ahead of the backward only from the second. Variants that
    crop on the device (+devaug, +devjpeg) draw other crops, so other batches: they are not compared."""
    name = loss_reference(rows)
    if name is None:  # nothing to compare with (a NaN or zero default loss is judged by the numerics check)
        return []
    cropped = {s for s in MODE_SOURCES.values() if s}
    compared = [k for k in LOSSES if _finite(rows[name].get(k))]
    return [
        v
        for v, r in rows.items()
        if v != name
        and not cropped & set(v.split("+"))
        # NaN is off too
        and any(k in r and not abs(r[k] - rows[name][k]) < LOSS_TOLERANCE * abs(rows[name][k]) for k in compared)
    ]


def _losses(row: dict) -> str:
    """A row's first and last losses as the verdict prints them."""
    return "/".join(f"{row[k]:.5f}" for k in LOSSES if k in row)


def loss_reference(rows: dict[str, dict]) -> str | None:
    """The variant whose first loss the others are compared with: the default step's, else the naive step's, if it
    is a finite number other than 0."""
    return next((v for v in (DEFAULT, "naive") if v in rows and _finite(rows[v].get("first_loss"))), None)


def _finite(loss) -> bool:
    return isinstance(loss, (int, float)) and math.isfinite(loss) and loss != 0


def time_lines(name: str, row: dict) -> list[str]:
    """Where the GPU time of the fastest variant went (its profile, if it has one), and the MFU it would reach with
    nothing but the kernels that do its FLOPs (matmul, convolution, attention): how far the levers that trim the rest
    can take it."""
    kinds = row.get("profile", {}).get("by_kind_s_per_step")
    if not kinds or row.get("mfu_measured") is None:
        return []
    core = sum(kinds.get(k, 0.0) for k in CORE_KINDS)
    rest = {k: v for k, v in kinds.items() if k not in CORE_KINDS}
    needed = row["mfu_measured"] * row["s_per_step"] / MFU_TARGET  # the step time that would reach the target
    split = ", ".join(f"{k} {1e3 * v:.1f}" for k, v in sorted(rest.items(), key=lambda kv: -kv[1]))
    ceiling = row["mfu_measured"] * row["s_per_step"] / core if core else float("inf")
    idle = row["profile"].get("idle")  # profiles from before 2026-11-28 have none
    return [
        *([f"the GPU in {name}'s profile: {describe_idle(idle)}"] if idle else []),
        f"time of {name} per step: "
        + ", ".join(f"{k} {1e3 * kinds.get(k, 0.0):.1f} ms" for k in CORE_KINDS)
        + f", the rest {1e3 * sum(rest.values()):.1f} ms ({split}), of {1e3 * row['profile']['busy_s_per_step']:.1f} "
        f"ms busy in a {1e3 * row['s_per_step']:.1f} ms step; with only those three kinds of kernels it would reach "
        f"{100 * ceiling:.1f}% MFU; {100 * MFU_TARGET:.0f}% needs a {1e3 * needed:.1f} ms step "
        f"({1e3 * (row['s_per_step'] - needed):.1f} ms less)",
    ]


def numerics_lines(numerics: dict) -> tuple[list[str], set[str]]:
    """The numerics target judged on ``numerics.json``; and the levers it covered if it failed (not defaults)."""
    flags = numerics.get("flags", {})
    used = {option for option, (_, flag) in LEVERS.items() if _sets(flags, flag)}
    rel, cosine, ratio = (numerics[k] for k in ("relative_loss_difference", "gradient_cosine", "norm_ratio"))
    passed = (
        numerics.get("non_finite_gradients", 0) == 0
        and rel < LOSS_TOLERANCE
        and cosine > COSINE_MIN
        and abs(ratio - 1) < NORM_TOLERANCE
    )
    named = " ".join(LEVERS[o][1] for o in sorted(used)) or "no lever flags"
    line = (
        f"numerics on {numerics.get('device', '?')} with {named}: relative loss difference {rel:.1e} (target < "
        f"{LOSS_TOLERANCE:g}), gradient cosine {cosine:.5f} (> {COSINE_MIN}), norm ratio {ratio:.4f}, non-finite "
        f"gradients {numerics.get('non_finite_gradients', 0)}: {_mark(passed)}"
    )
    return [line], set() if passed else used


def _sets(flags: dict, flag: str) -> bool:
    """Whether the trainer flags in ``flags`` (name -> value, as numerics.json holds them) include ``flag``
    ("--packed_qkv True", a value of ``LEVERS``)."""
    name, value = flag.removeprefix("--").split(" ", 1)
    return name in flags and str(flags[name]) == value


def kernel_lines(kernels: dict) -> list[str]:
    """What ``benchmarks.kernel_bench`` measured: the step's attention time with each kernel first, the patch
    embedding's two ways, the last block's and the text tower's (milliseconds per step, the kernels alone). A
    section that failed is said so; one not measured (the part cut off, or an older kernels.json) is left out."""
    times = kernels["step_attention_s"]
    attention = ", ".join(
        f"{k if k == 'auto' else k + ' first'} {1e3 * v:.1f} ms" for k, v in sorted(times.items(), key=lambda kv: kv[1])
    )
    lines = [
        f"attention kernels alone on {kernels['device']} at {kernels['batch']} (per step, fastest first): "
        f"{attention}; tried in the step: --attention_kernel {kernels['best_attention_kernel']}"
    ]
    sections = {
        "patch_embed": (
            "patch embedding alone",
            lambda p: (
                f"convolution {1e3 * p['conv']:.2f} ms, linear {1e3 * p['linear']:.2f} ms per step "
                f"({p['conv'] / p['linear']:.2f}x)"
            ),
        ),
        "last_block": (
            "last block alone",
            lambda b: (
                f"every row {1e3 * b['full']:.2f} ms, class token's row {1e3 * b['cls']:.2f} ms per step "
                f"({b['full'] / b['cls']:.2f}x)"
            ),
        ),
        "text_tower": (
            "text tower alone",
            lambda t: (
                f"{t['context']} tokens {1e3 * t['full']:.2f} ms, cut to {t['width']} (--trim_text, the "
                f"default) {1e3 * t['trimmed']:.2f} ms per step ({t['full'] / t['trimmed']:.2f}x)"
            ),
        ),
    }
    for key, (what, describe) in sections.items():
        row = kernels.get(key)
        if row and "error" in row:
            lines.append(f"{what}: failed ({row['error'].splitlines()[0]}); its lever is not tried")
        elif row:
            lines.append(f"{what}: {describe(row)}")
    return lines


def epilogue_lines(epilogue: dict) -> list[str]:
    """What ``benchmarks.epilogue_bench`` measured: the MLP halves of the student's image blocks per step, compiled
    each way, against torch's default mode, with each way's first call (its compile and tuning)."""
    ways = epilogue["ways"]
    default = next((row.get("step_s") for row in ways if row["way"] == "default"), None)
    described = []
    for row in ways:
        way = row["way"]
        if "error" in row:
            described.append(f"{way} failed ({row['error'][:120]})")
            continue
        gain = f"{default / row['step_s']:.3f}x, " if default and way != "default" else ""
        kinds = row.get("profile", {}).get("by_kind_s_per_step", {})  # per call
        split = "".join(f", {kind} {1e3 * s * epilogue['layers']:.1f}" for kind, s in kinds.items())
        described.append(f"{way} {1e3 * row['step_s']:.1f} ms ({gain}first call {row['first_s']} s{split})")
    stopped = "" if epilogue.get("complete", True) else "; stopped before its end (time limit?)"
    return [
        f"MLP halves alone (the student's {epilogue['layers']} image blocks per step, forward and backward, on "
        f"{epilogue['device']} at {epilogue['batch']}): {', '.join(described) or 'none measured'}{stopped}"
    ]


def lever_lines(rows: dict[str, dict], unsafe: frozenset[str] = frozenset(), unchecked: bool = False) -> list[str]:
    """For each variant timed with and without one of ``LEVERS``, the step's speed with it over without; and for each
    with several, its speed over the variant with none of them. A lever in ``unsafe`` (its numerics check failed)
    is never advised as a default; with ``unchecked`` (no numerics.json at all in this OUT: the numerics part
    failed, was cut off or did not run) none is advised without one. (A numerics.json covers the levers of its own
    flags only; the others, +tstream or max-autotune, are judged on speed and on ``wrong_losses``.)"""

    def advice(ratio: float, used: list[str], flags: str) -> str:
        if ratio < GAIN:
            return "no gain worth a default"
        if unsafe & set(used):
            return f"faster, but not a default: the numerics check with {', '.join(sorted(unsafe & set(used)))} failed"
        if unchecked and set(used) & set(CHECKED_LEVERS):  # gpu_numerics takes their flags; compile options not
            return f"worth making the default ({flags}) only once a numerics check with it passes: none in this OUT"
        return f"worth making the default ({flags})"

    lines = []
    for option in LEVERS:
        for name, row in rows.items():
            options = name.split("+")
            if option not in options:
                continue
            # a lever that needs another is a default only with it: judged against neither (+autotune+tma against
            # the same variant compiled in torch's default mode), and beside the other alone where that was timed
            without = [REQUIRES[option], option] if option in REQUIRES else [option]
            base = rows.get("+".join(o for o in options if o not in without))
            if base is None:
                continue
            ratio = row["videos_per_s"] / base["videos_per_s"]
            also = rows.get("+".join(o for o in options if o != option)) if option in REQUIRES else None
            judged, alone = ratio, ""
            if also:  # a default only if it beats the other lever alone as well
                judged = min(ratio, row["videos_per_s"] / also["videos_per_s"])
                alone = f"; {row['videos_per_s'] / also['videos_per_s']:.3f}x {also['variant']}"
            cost = ""
            if {"autotune", "tma"} & set(without) and "first_step_s" in row and "first_step_s" in base:
                cost = f"; first step {row['first_step_s']} s against {base['first_step_s']} s"
            what = " with ".join(LEVERS[o][0] for o in without)
            flags = " ".join(LEVERS[o][1] for o in without)
            them = "them" if len(without) > 1 else "it"
            lines.append(
                f"{what}: {name} {ratio:.3f}x the step without {them}{alone}{cost}: {advice(judged, without, flags)}"
            )
    for name, row in rows.items():  # levers timed together, against the variant with none of them
        options = name.split("+")
        used = [o for o in LEVERS if o in options]
        base = rows.get("+".join(o for o in options if o not in LEVERS)) if len(used) > 1 else None
        if base is None:
            continue
        ratio = row["videos_per_s"] / base["videos_per_s"]
        flags = " ".join(LEVERS[o][1] for o in used)
        lines.append(
            f"{' and '.join(used)} together: {name} {ratio:.3f}x the step without them: {advice(ratio, used, flags)}"
        )
    return lines


def mode_demand(rows: dict[str, dict], mode: str) -> dict | None:
    """The step the loader has to feed in ``mode``: the fastest variant timed with its batches as that mode hands
    them (the levers change the demand, so the margin is judged against the most demanding step, not the default's)."""
    source, on_device = MODE_SOURCES[mode], {s for s in MODE_SOURCES.values() if s}

    def fed(options: set[str]) -> bool:  # as the loader feeds the step in this mode
        return source in options if source else not options & on_device

    candidates = [row for name, row in rows.items() if name != "naive" and fed(set(name.split("+")))]
    return max(candidates, key=lambda row: row["videos_per_s"], default=None)


def prefetch_lines(rows: dict[str, dict]) -> list[str]:
    """For each variant timed with +prefetch and without: what overlapping the batch's copy with the step (as the
    trainer feeds every mode) saves. Not a lever to advise: the trainer always does it."""
    lines = []
    for name, row in rows.items():
        options = name.split("+")
        base = rows.get("+".join(o for o in options if o != "prefetch")) if "prefetch" in options else None
        if base is None:
            continue
        ratio = row["videos_per_s"] / base["videos_per_s"]
        saved = f" ({1e3 * (base['s_per_step'] - row['s_per_step']):.1f} ms a step)" if "s_per_step" in row else ""
        lines.append(
            f"the batch's copy overlapped, as the trainer feeds the step: {name} {ratio:.3f}x {base['variant']}{saved}"
        )
    return lines


def loader_lines(loader: dict, step: dict | None) -> tuple[list[str], str | None]:
    """One line per mode: loader videos/s over the step's demand in that mode; and the mode to default to."""
    rows: dict[str, dict] = {}  # per mode, the most videos/s within the worker budget
    for r in loader["rows"]:
        if r["workers"] <= MAX_WORKERS and r["videos_per_s"] > rows.get(r["augment_on"], {}).get("videos_per_s", -1):
            rows[r["augment_on"]] = r
    variants = _ok(step["rows"]) if step else {}
    lines, margins = [], {}
    for mode, row in rows.items():
        demand = mode_demand(variants, mode)
        if demand is None:
            lines.append(f"loader, --augment_on {mode}: {row['videos_per_s']:.0f} videos/s, {row['workers']} workers")
            continue
        margin = row["videos_per_s"] / demand["videos_per_s"]
        margins[mode] = (margin, demand["videos_per_s"])
        lines.append(
            f"loader, --augment_on {mode}: {row['videos_per_s']:.0f} videos/s with {row['workers']} workers = "
            f"{margin:.2f}x the step's {demand['videos_per_s']:.0f} videos/s ({demand['variant']}) "
            f"(target {LOADER_MARGIN}x): " + _mark(margin >= LOADER_MARGIN)
        )
    if not margins:
        return lines, None
    # the fastest step among the modes that feed it with the margin; else the fastest the loader can keep fed
    fed = {m: s for m, (margin, s) in margins.items() if margin >= LOADER_MARGIN}
    if fed:
        choice = max(fed, key=fed.get)
    else:
        choice = max(margins, key=lambda m: min(margins[m][1], margins[m][1] * margins[m][0]))
    return lines, choice


def memory_lines(memory: dict, cap_gib: float = 80.0) -> tuple[list[str], str | None]:
    """Which variants fit under the cap (peak GPU memory), fastest first; and the checkpointing to suggest."""
    rows = memory["rows"]
    if not any("peak_gib" in r for r in rows):
        return [f"memory: not measured on {memory['device']} (no GPU memory figures)"], None
    lines, fits = [], {}
    for r in rows:
        if r.get("status") == "ok" and r.get("peak_gib", float("inf")) <= cap_gib:
            fits[r["variant"]] = r
            lines.append(f"{r['batch']} {r['variant']}: fits, {r['peak_gib']:.1f} GiB, {r['s_per_step']:.3f} s/step")
        else:
            lines.append(f"{r['batch']} {r['variant']}: {r.get('status')} ({r.get('peak_gib', float('nan')):.1f} GiB)")
    batch = rows[0]["batch"].replace("x", "+")
    if not fits:
        return lines + [f"{batch} under {cap_gib:.0f} GiB: NOT MET (nothing fit)"], None
    best = min(fits, key=lambda v: fits[v]["s_per_step"])
    lines.append(f"{batch} under {cap_gib:.0f} GiB: MET; fastest {best}, {fits[best]['s_per_step']:.3f} s/step")
    return lines, str(checkpointed_blocks(set(best.split("+"))))  # "+ckpt" alone: True, every block


def cut_short(part: str, record: dict) -> list[str]:
    """A line for a part that stopped before its end (gpu_step.sh's time limit): judged on the rows it wrote."""
    if record.get("complete", True):  # records from before the flag existed were written only when complete
        return []
    return [f"{part}: stopped before its end (time limit?); judged on the {len(record['rows'])} row(s) it wrote"]


def verdict(
    step: dict | None,
    loader: dict | None,
    memory: dict | None,
    tune: dict | None = None,
    numerics: dict | None = None,
    kernels: dict | None = None,
    epilogue: dict | None = None,
) -> list[str]:
    lines = []
    for part, record in (("step", step), ("tune", tune), ("loader", loader), ("memory", memory)):
        lines += cut_short(part, record) if record else []
    if tune and tune["rows"]:  # the same batches on the same card: one set of step variants
        step = {**tune, "rows": step["rows"] + tune["rows"]} if step else tune
    step, loader, memory = (r if r and r["rows"] else None for r in (step, loader, memory))  # nothing to judge
    more, unsafe = numerics_lines(numerics) if numerics else ([], set())
    if step:
        lines += step_lines(step, frozenset(unsafe), unchecked=numerics is None)
    lines += more
    lines += kernel_lines(kernels) if kernels else []
    lines += epilogue_lines(epilogue) if epilogue else []
    if loader:
        more, mode = loader_lines(loader, step)
        lines += more
        if mode:
            lines.append(f"suggested GPU default: --augment_on {mode} (train.loop.augment_on's 'auto')")
    if memory:
        more, blocks = memory_lines(memory, memory.get("memory_gib") or 80.0)  # the cap the run used
        lines += more
        if blocks:
            lines.append(f"suggested for that batch on an 80 GB card: --grad_checkpointing {blocks}")
    return lines or ["nothing to judge: no step, tune, numerics, kernels, epilogue, loader or memory results found"]


# gpu_step.sh's TUNE_MIN_S, EPILOGUE_S and NUMERICS_S (tests/test_gpu_step.py checks they agree)
TUNE_MIN_S, EPILOGUE_S, NUMERICS_S = 120, 160, 60
FILL = "SECONDS_LEFT_LESS_40"  # the next call's BUDGET, for the session to fill in (gpu_step.sh refuses it as is)


def autotune_gain(epilogue: dict | None) -> float | None:
    """The epilogue part's best max-autotune way against torch's default mode (its default's time over the way's),
    or None where it measured no such pair."""
    ways = (epilogue or {}).get("ways", [])
    default = next((row.get("step_s") for row in ways if row["way"] == "default" and "error" not in row), None)
    tuned = [row["step_s"] for row in ways if row["way"] != "default" and "error" not in row and "step_s" in row]
    return default / min(tuned) if default and tuned else None


# the step variants' options whose trainer flags benchmarks.gpu_numerics checks (layer levers, attention kernels,
# the teacher's stream): one that beat the step it was added to is a default only once a numerics check with it has
# passed (compile options, +cdt or +autotune, are judged on speed and on wrong_losses)
CHECKED_LEVERS = ("qkv", "split", "patch", "cls", "cudnn", "flash", "efficient", "math", "tstream", "tahead")


def unchecked_gains(step: dict | None, levers: str, numerics: dict | None) -> list[str]:
    """The options of ``CHECKED_LEVERS`` that made the step faster by ``GAIN`` and whose flags ``numerics`` (this
    call's numerics.json, or None) did not check: those ``levers`` adds to the default (against the default), and
    those added to ``levers`` fed as the trainer feeds it (+prefetch, against it)."""
    rows = _ok(step["rows"]) if step else {}
    checked = {o for o in CHECKED_LEVERS if numerics and _sets(numerics.get("flags", {}), LEVERS[o][1])}

    def faster(variant: str, base: str) -> bool:
        return variant in rows and base in rows and rows[variant]["videos_per_s"] >= rows[base]["videos_per_s"] * GAIN

    own = levers.removeprefix(DEFAULT).split("+")[1:] if faster(levers, DEFAULT) else []
    fed = f"{levers}+prefetch"
    added = [o for o in CHECKED_LEVERS if faster(f"{fed}+{o}", fed)]
    return [o for o in CHECKED_LEVERS if o in own + added and o not in checked]


# device-seconds of a second call beyond its parts: the script's start (11-12 s on the H200 before its first part),
# the verdict (BUDGET keeps 20 for it), BUDGET's 40 less than what is left, the machine already warm
CALL_S = 20 + 20 + 40
# what one step variant adds to a second call on the warm machine: one whose graph this call compiled (inductor's
# caches: 7.5 s for its first step on 2026-11-28's H200, then its timing and profile), one compiled afresh (68-89 s
# then), +cdt (a compile and the tuning of every Triton kernel: not measured), and step_variants' own start
CACHED_S, FRESH_S, TUNED_S, STEP_START_S = 20, 90, 180, 15
# what a session has left for a second call after a full first one: 900 device-seconds less the machine's start
# (about 35 s) and the first call's 595 s at most (2026-11-28: 314 s left after a first call of 551 s)
SECOND_CALL_S = 270


def next_call_lines(
    step: dict | None, tune: dict | None, epilogue: dict | None, levers: str, numerics: dict | None = None
) -> list[str]:
    """The second call a lent session should make on the warm machine, from what this call measured (step, tune and
    epilogue as written, before the verdict merges them; numerics, this call's numerics.json), first to last: the
    step variants that the MFU target is judged on, if the step part's time limit cut them off; the numerics check
    of a layer lever that made the step faster but was not checked (``unchecked_gains``: a default needs it); none
    if the epilogue part found max-autotune no faster than torch's default mode on the MLP halves (where its Triton
    templates would fuse QuickGELU into the products); the max-autotune variants of ``levers`` if this call did not
    time both; else none. Two lines: why, with the device-seconds it needs, then the bare command. Device time is
    the tool's to count, so the command's BUDGET (``FILL``) is left to the session to fill in."""
    if not levers:
        return []
    timed = {r["variant"] for r in step["rows"]} if step else set()
    fed = f"{levers}+prefetch"
    # gpu_step.sh's candidates for the best step, after the default they are judged against (where LEVERS is more)
    judged = [*([DEFAULT] if levers != DEFAULT else []), levers, fed, f"{fed}+split", f"{fed}+cdt"]
    cut = [v for v in judged if v not in timed] if step and step.get("complete", True) is False else []
    if cut:
        return _cut_call(levers, fed, cut)
    gains = unchecked_gains(step, levers, numerics)
    if gains:
        checked = "+".join([levers, *(o for o in gains if o not in levers.split("+"))])
        return _call(
            f"PARTS=numerics LEVERS={checked}",
            f"{', '.join('+' + o for o in gains)} made the step faster, and no numerics check with "
            f"{'it' if len(gains) == 1 else 'them'} has run: a default needs one",
            NUMERICS_S + CALL_S,
        )
    if not (step or tune or epilogue):  # a call of other parts (a numerics check, say): nothing here to follow up
        return ["next call: none (this call timed no step); give the machine back"]
    tuned = _ok(tune["rows"]) if tune else {}
    if all(f"{levers}+{way}" in tuned for way in ("autotune+tma", "autotune")):
        return ["next call: none needed (both max-autotune variants were timed); give the machine back"]
    gain = autotune_gain(epilogue)
    # a tuned way measured no faster says enough (+tma's candidates include +autotune's); else only a complete part
    if epilogue and ((gain is not None and gain < GAIN) or (gain is None and epilogue.get("complete", True))):
        found = f"at best {gain:.3f}x" if gain else "none measured"
        return [
            "next call: none needed (max-autotune's MLP halves were no faster than torch's default mode's: "
            f"{found}; the whole step's tune would not gain either); give the machine back"
        ]
    # the epilogue again only where it answered nothing (a tuned way measured and faster answers: on to the tune)
    again = epilogue and gain is None and not epilogue.get("complete", True)
    variants = f"{levers},{levers}+autotune+tma,{levers}+autotune"
    return _call(
        f'PARTS="{"epilogue tune" if again else "tune"}" LEVERS={levers} TUNE_VARIANTS={variants}',
        "this call did not time both max-autotune variants",
        # the tune part starts with at least TUNE_MIN_S of BUDGET left, after the epilogue's EPILOGUE_S
        TUNE_MIN_S + CALL_S + (EPILOGUE_S if again else 0),
    )


def _cut_call(levers: str, fed: str, cut: list[str]) -> list[str]:
    """The step call that times what the step part's time limit cut off, with the steps those are judged against
    (the default for LEVERS, LEVERS fed for what is added to it; this call's OUT starts empty), and the seconds it
    needs on the warm machine. Cut variants that would take it past ``SECOND_CALL_S`` are left to a later session,
    from the list's end (at least one is timed)."""

    def seconds(variant: str, variants: list[str]) -> int:
        # compiled in this call, or LEVERS' graph (compiled in this call, or first in the next)
        if variant not in cut or (variant == fed and (levers in variants or levers not in cut)):
            return CACHED_S
        return TUNED_S if "cdt" in variant.split("+") else FRESH_S

    def cost(variants: list[str]) -> int:
        return CALL_S + STEP_START_S + sum(seconds(v, variants) for v in variants)

    def listed(timed: list[str]) -> list[str]:
        bases = [DEFAULT] if levers in timed and levers != DEFAULT else []  # LEVERS is judged against the default
        bases += [fed] if any(v.startswith(f"{fed}+") for v in timed) and fed not in timed else []
        return list(dict.fromkeys([*bases, *timed]))

    kept = list(cut)  # the levers added to LEVERS fed go first; the steps the MFU is judged on stay
    while len(kept) > 1 and kept[-1] not in (DEFAULT, levers, fed) and cost(listed(kept)) > SECOND_CALL_S:
        kept.pop()
    left = cut[len(kept) :]
    later = f"; {', '.join(left)} left for a later session (the call would need {cost(listed(cut))} s)" if left else ""
    return _call(
        f"PARTS=step LEVERS={levers} STEP_VARIANTS={','.join(listed(kept))}",
        f"the step part's time limit cut off {', '.join(cut)}; on the warm machine inductor's caches make the "
        f"compile of what this call compiled short{later}",
        cost(listed(kept)),
    )


def _call(settings: str, why: str, seconds: int) -> list[str]:
    """The two lines of a next call that needs ``seconds`` device-seconds left (its parts, the verdict, the start)."""
    return [
        f"next call, only with at least {seconds} device-seconds left (timeout_s: those seconds less 20; BUDGET: "
        f"less 40): {why}",
        f"next call: {settings} BUDGET={FILL} OUT=$OUT bash benchmarks/gpu_step.sh",
    ]


def _load(folder: Path, pattern: str) -> dict | None:
    found = sorted(folder.glob(pattern))
    return json.loads(found[0].read_text()) if found else None


def main(out: str = "benchmarks/output", levers: str = "") -> None:
    """Print issue 6's verdict from the JSON files gpu_step.sh wrote into OUT; with ``--levers`` (gpu_step.sh's
    LEVERS), also the device call to make next.

    Args:
        out: the folder benchmarks/gpu_step.sh wrote its JSON files into (its OUT).
        levers: the step variant gpu_step.sh timed as LEVERS, e.g. ours+compile+cteacher+qkv+patch+cls; "" = no
            line about the next device call.
    """
    folder = Path(str(out))
    if not folder.is_dir():
        raise SystemExit(f"error: --out {out} is not a folder; point it at the OUT of benchmarks/gpu_step.sh")
    if not isinstance(levers, str) or (levers and not levers.startswith(DEFAULT)):
        raise SystemExit(f"error: --levers must be a step variant that starts with {DEFAULT}, got {levers!r}")
    patterns = ("step_variants_*.json", "tune/step_variants_*.json", "epilogue.json")
    step, tune, epilogue = (_load(folder, pattern) for pattern in patterns)
    numerics = _load(folder, "numerics.json")
    lines = verdict(
        step,
        _load(folder, "loader_bench.json"),
        _load(folder / "memory", "step_variants_*.json"),
        tune,
        numerics,
        _load(folder, "kernels.json"),
        epilogue,
    )
    lines += next_call_lines(step, tune, epilogue, levers, numerics)
    print("\n".join(["issue 6 verdict:"] + [f"  {line}" for line in lines]))


if __name__ == "__main__":
    fire_main(main)
