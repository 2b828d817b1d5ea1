"""Result records: one JSON per (model, dataset), merged into the paper's tables; the alpha-sweep plot.

Layout of an output folder::

    OUT/<model_name>/<dataset_name>.json   one record per evaluation (or a skipped dataset), written atomically
    OUT/summary.md                         the tables, rebuilt from the records by :func:`write_summary`

A record holds at least ``dataset``, ``model``, ``weights``, ``metrics``, ``num_expected``, ``num_found``,
``num_missing``, ``missing`` (ids), ``config`` and ``code_version``. A dataset that could not be evaluated is a
record with ``"skipped": true`` and ``reason`` (and ``path``, the file that was missing) instead of the metrics.
"""

from __future__ import annotations

import importlib.metadata
import io
import json
import math
import re
import subprocess
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

from eval.datasets.youcook2 import CSV_NAME as YOUCOOK2_CSV
from pipeline.writer import atomic_write_bytes, json_bytes

REPO = Path(__file__).resolve().parents[1]
SUMMARY_NAME = "summary.md"
REQUIRED_KEYS = (
    "dataset",
    "model",
    "weights",
    "metrics",
    "num_expected",
    "num_found",
    "num_missing",
    "missing",
    "config",
    "code_version",
)
SKIPPED_REQUIRED_KEYS = ("dataset", "model", "skipped", "reason")
DASH = "–"
INTEGER_METRICS = ("MdR", "num")  # shown without decimals when whole
PAPER_ALPHA = 0.4  # the paper's fusion weight, marked on the alpha-sweep plot


@dataclass(frozen=True)
class Benchmark:
    """One of the paper's benchmark tables."""

    key: str
    short: str  # the name in the overview table and in footnotes
    title: str  # the table's heading
    names: tuple[str, ...]  # dataset names (normalised: lowercase alphanumerics) that belong to this table
    columns: tuple[tuple[str, str], ...]  # (header, metric key) per column
    headline: str  # the metric key of this benchmark's overview column


CLASSIFICATION_COLUMNS = (("top-1", "top1"), ("top-5", "top5"))
RETRIEVAL_COLUMNS = (("R@1", "R@1"), ("R@5", "R@5"), ("R@10", "R@10"), ("MdR", "MdR"))
RETRIEVAL_UNITS = "text-to-video (R@1 / R@5 / R@10, MdR)"

BENCHMARKS: tuple[Benchmark, ...] = (
    Benchmark(
        "ucf101",
        "UCF101",
        "Table 1a: UCF101 (top-1 / top-5 accuracy, %)",
        ("ucf101", "ucf"),
        CLASSIFICATION_COLUMNS,
        "top1",
    ),
    Benchmark(
        "moments",
        "MiT",
        "Table 1b: Moments in Time (top-1 / top-5, %)",
        ("moments", "momentsintime", "mit"),
        CLASSIFICATION_COLUMNS,
        "top1",
    ),
    Benchmark(
        "msrvtt",
        "MSR-VTT",
        f"Table 2a: MSR-VTT 1k-A {RETRIEVAL_UNITS}",
        ("msrvtt", "msrvtt1ka", "msrvtt1k"),
        RETRIEVAL_COLUMNS,
        "R@5",
    ),
    Benchmark(
        "youcook2",
        "YouCook2",
        f"Table 2b: YouCook2 {RETRIEVAL_UNITS}",
        ("youcook2", "youcook"),
        RETRIEVAL_COLUMNS,
        "R@5",
    ),
    Benchmark(
        "didemo",
        "DiDeMo",
        f"Table 2c: DiDeMo (paragraph) {RETRIEVAL_UNITS}",
        ("didemo", "didemoparagraph"),
        RETRIEVAL_COLUMNS,
        "R@5",
    ),
)
OVERVIEW_TITLE = "Table 3: overview (UCF101 top-1, MiT top-1, MSR-VTT / YouCook2 / DiDeMo R@5)"

# The paper's zero-shot results (ViT-B/16, 4 frames); REFERENCE.md's table. Absent keys: not given by the paper.
PAPER_RESULTS: dict[str, dict[str, dict[str, float]]] = {
    "CLIP (teacher)": {
        "ucf101": {"top1": 74.5, "top5": 94.3},
        "moments": {"top1": 19.9, "top5": 40.3},
        "msrvtt": {"R@1": 30.4, "R@5": 55.1, "R@10": 64.1, "MdR": 4},
        "youcook2": {"R@1": 5.3, "R@5": 14.6, "R@10": 20.9, "MdR": 94},
        "didemo": {"R@1": 26.2, "R@5": 49.9, "R@10": 60.6, "MdR": 5},
    },
    "Student": {
        "ucf101": {"top1": 64.7},
        "moments": {"top1": 17.7},
        "msrvtt": {"R@5": 52.6},
        "youcook2": {"R@5": 9.7},
        "didemo": {"R@5": 42.4},
    },
    "FitCLIP": {
        "ucf101": {"top1": 73.3, "top5": 95.3},
        "moments": {"top1": 21.8, "top5": 44.6},
        "msrvtt": {"R@1": 33.8, "R@5": 59.8, "R@10": 69.4, "MdR": 3},
        "youcook2": {"R@1": 5.8, "R@5": 15.5, "R@10": 22.1, "MdR": 75},
        "didemo": {"R@1": 28.5, "R@5": 53.7, "R@10": 64.0, "MdR": 4},
    },
}


# ----- records


def code_version() -> str:
    """``git describe --always --dirty`` of this repository; else the installed package's version; else "unknown"."""
    if (REPO / ".git").exists():  # only our own checkout: an installed copy must not describe some enclosing repo
        try:
            out = subprocess.run(
                ["git", "describe", "--always", "--dirty"],
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            )
            if out.stdout.strip():
                return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        return importlib.metadata.version("fitclip")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _check_path_part(name: str, what: str) -> None:
    if not is_path_part(name):
        raise ValueError(f"{what} {name!r} cannot be a file name: use a name without slashes")


def is_path_part(name: str) -> bool:
    """Whether ``name`` can be one file or folder name (no slashes, not . or ..)."""
    return bool(name) and name not in (".", "..") and not any(c in name for c in "/\\\0")


def result_path(out_dir: str | Path, model_name: str, dataset_name: str) -> Path:
    return Path(out_dir) / model_name / f"{dataset_name}.json"


def write_result(out_dir: str | Path, model_name: str, dataset_name: str, record: dict) -> Path:
    """Write ``record`` to ``OUT/<model_name>/<dataset_name>.json`` atomically; returns the path."""
    _check_path_part(model_name, "model name")
    _check_path_part(dataset_name, "dataset name")
    required = SKIPPED_REQUIRED_KEYS if record.get("skipped") else REQUIRED_KEYS
    absent = [k for k in required if k not in record]
    if absent:
        raise ValueError(f"result record for {model_name}/{dataset_name} lacks {absent}; a record needs {required}")
    path = result_path(out_dir, model_name, dataset_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json_bytes(record))
    return path


def is_result(obj) -> bool:
    """Whether a parsed JSON is a result record (evaluated or skipped)."""
    return isinstance(obj, dict) and "dataset" in obj and "model" in obj and ("metrics" in obj or "skipped" in obj)


def load_results(out_dir: str | Path) -> list[dict]:
    """All records under ``OUT/*/*.json``, in path order; other JSON files are skipped (unreadable ones with a
    warning)."""
    results = []
    for path in sorted(Path(out_dir).glob("*/*.json")):
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            warnings.warn(f"skipping unreadable JSON {path}: {e}", stacklevel=2)
            continue
        if is_result(obj):
            results.append(obj)
    return results


# ----- markdown


def _normalise(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def benchmark_of(dataset_name: str) -> Benchmark | None:
    """The paper table a dataset belongs to, by name ("ucf101", "MSR-VTT", "msrvtt_1ka", ...), or None."""
    norm = _normalise(dataset_name)
    return next((b for b in BENCHMARKS if norm in b.names), None)


def headline_metric(dataset_name: str) -> str | None:
    """The metric key the overview table shows for a dataset (top1 or R@5), or None for an unknown dataset."""
    bench = benchmark_of(dataset_name)
    return bench.headline if bench else None


def format_value(value, metric: str = "") -> str:
    """One decimal, rounded half up (73.25 -> "73.3"); MdR and counts as plain integers when whole; "–" when
    absent."""
    if value is None:
        return DASH
    value = float(value)
    if not math.isfinite(value):
        return str(value)
    if metric in INTEGER_METRICS and value == int(value):
        return str(int(value))
    return str(Decimal(repr(value)).quantize(Decimal("0.1"), rounding=ROUND_HALF_UP))


def _table(header: list[str], rows: list[list[str]], text_columns: int = 1) -> list[str]:
    """A markdown table; the first ``text_columns`` columns left-aligned, the numbers right-aligned."""
    align = ["---"] * text_columns + ["---:"] * (len(header) - text_columns)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]  # a | in a name
    return lines


def _italic(text: str) -> str:
    return f"*{text}*" if text != DASH else text


class _Footnotes:
    """Numbered notes on missing videos, one number per (model, dataset), shared by all tables."""

    def __init__(self):
        self.numbers: dict[tuple[str, str], int] = {}
        self.texts: dict[int, str] = {}

    def mark(self, record: dict, dataset_label: str) -> str:
        """The marker ``" [n]"`` when the record's dataset had missing videos, else an empty string."""
        missing = record.get("num_missing")
        if missing is None and "num_found" in record and "num_expected" in record:
            missing = record["num_expected"] - record["num_found"]
        if not missing or missing <= 0:
            return ""
        key = (record["model"], record["dataset"])
        if key not in self.numbers:
            n = len(self.numbers) + 1
            self.numbers[key] = n
            found, expected = record.get("num_found", "?"), record.get("num_expected", "?")
            self.texts[n] = (
                f"[{n}] {record['model']}, {dataset_label}: {found} of {expected} videos found ({missing} missing)."
            )
        return f" [{self.numbers[key]}]"

    def block(self, numbers: Iterable[int]) -> list[str]:
        numbers = sorted(set(numbers))
        return ["", *(self.texts[n] for n in numbers)] if numbers else []


def _used_numbers(rows: list[list[str]]) -> list[int]:
    """The footnote numbers the rows' cells end with; not the model's name (its first cell), which may end so too
    (``--names "baseline [7]"``)."""
    return [int(m) for row in rows for cell in row[1:] for m in re.findall(r" \[(\d+)\]$", cell)]


def _organise(results: list[dict]) -> tuple[list[str], dict[str, dict[str, dict]], list[dict], list[dict]]:
    """Models in order of first appearance; {model: {benchmark key: record}}; other-dataset records; skipped ones.

    When a model has two records for one benchmark, the later one wins.
    """
    models: list[str] = []
    by_model: dict[str, dict[str, dict]] = {}
    others: list[dict] = []
    skipped: list[dict] = []
    for rec in results:
        if rec.get("skipped"):
            skipped.append(rec)
            continue
        model = str(rec["model"])
        if model not in by_model:
            models.append(model)
            by_model[model] = {}
        bench = benchmark_of(str(rec["dataset"]))
        if bench is None:
            others.append(rec)
        else:
            by_model[model][bench.key] = rec
    return models, by_model, others, skipped


def _benchmark_section(
    bench: Benchmark, models: list[str], by_model: dict, notes: _Footnotes, include_paper: bool
) -> list[str]:
    rows = []
    for model in models:
        rec = by_model[model].get(bench.key)
        metrics = rec["metrics"] if rec else {}
        cells = [format_value(metrics.get(key), key) for _, key in bench.columns]
        if rec:
            cells[0] += notes.mark(rec, bench.short)
        rows.append([model, *cells])
    if include_paper:
        for name, paper in PAPER_RESULTS.items():
            metrics = paper.get(bench.key, {})
            cells = [_italic(format_value(metrics.get(key), key)) for _, key in bench.columns]
            rows.append([f"*{name} (paper)*", *cells])
    header = ["Model", *(h for h, _ in bench.columns)]
    return [f"## {bench.title}", "", *_table(header, rows), *notes.block(_used_numbers(rows)), ""]


def _column_header(bench: Benchmark, metric: str) -> str:
    return next(h for h, key in bench.columns if key == metric)


def _overview_section(models: list[str], by_model: dict, notes: _Footnotes, include_paper: bool) -> list[str]:
    rows = []
    for model in models:
        cells = []
        for bench in BENCHMARKS:
            rec = by_model[model].get(bench.key)
            if rec is None:
                cells.append(DASH)
            else:
                value = format_value(rec["metrics"].get(bench.headline), bench.headline)
                cells.append(value + notes.mark(rec, bench.short))
        rows.append([model, *cells])
    if include_paper:
        for name, paper in PAPER_RESULTS.items():
            cells = [_italic(format_value(paper.get(b.key, {}).get(b.headline), b.headline)) for b in BENCHMARKS]
            rows.append([f"*{name} (paper)*", *cells])
    header = ["Model", *(f"{b.short} {_column_header(b, b.headline)}" for b in BENCHMARKS)]
    return [f"## {OVERVIEW_TITLE}", "", *_table(header, rows), *notes.block(_used_numbers(rows)), ""]


def _others_section(others: list[dict], notes: _Footnotes) -> list[str]:
    if not others:
        return []
    rows = []
    for rec in others:
        metrics = ", ".join(f"{k} {format_value(v, k)}" for k, v in rec["metrics"].items() if _is_number(v))
        rows.append([str(rec["model"]), str(rec["dataset"]) + notes.mark(rec, str(rec["dataset"])), metrics or DASH])
    table = _table(["Model", "Dataset", "Metrics"], rows, text_columns=3)
    return ["## Other datasets", "", *table, *notes.block(_used_numbers(rows)), ""]


def _is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _skipped_section(skipped: list[dict]) -> list[str]:
    if not skipped:
        return []
    groups: dict[tuple[str, str, str], list[str]] = {}
    for rec in skipped:
        key = (str(rec["dataset"]), str(rec.get("reason", "")), str(rec.get("path", "")))
        models = groups.setdefault(key, [])
        if str(rec["model"]) not in models:
            models.append(str(rec["model"]))
    lines = ["## Skipped datasets", ""]
    for (dataset, reason, path), models in groups.items():
        where = f" (`{path}`)" if path else ""
        lines.append(f"- {dataset} ({', '.join(models)}): {reason or 'no reason given'}{where}")
    return [*lines, ""]


def _models_section(results: list[dict], models: list[str]) -> list[str]:
    first = {}
    for rec in results:
        if not rec.get("skipped"):
            first.setdefault(str(rec["model"]), rec)
    rows = [[m, f"`{first[m].get('weights', DASH)}`", f"`{first[m].get('code_version', DASH)}`"] for m in models]
    return ["## Models", "", *_table(["Model", "Weights", "Code version"], rows, text_columns=3), ""] if rows else []


PAPER_MODEL, PAPER_FRAMES = "ViT-B-16-quickgelu", 4  # what the paper's rows ran (OpenAI's ViT-B/16)


def protocol_notes(results: list[dict]) -> list[str]:
    """Where the runs behind ``results`` evaluated otherwise than the authors' code, whose numbers the paper's rows
    are (REFERENCE.md), each with the flag that matches it; no lines if nowhere. A reader comparing rows must know."""
    scored = [rec for rec in results if not rec.get("skipped")]
    configs = [rec.get("config") or {} for rec in scored]
    notes = []
    if any(c.get("renormalize_video") for c in configs):
        notes.append(
            "video embeddings are the mean of the frame embeddings, re-normalised; the authors' code does not "
            "re-normalise it (`--renormalize_video False`), which changes the retrieval tables' rankings, not the "
            "classification ones"
        )
    if any(c.get("didemo_split") == "test" for rec, c in zip(scored, configs, strict=True) if _is(rec, "didemo")):
        notes.append(
            "DiDeMo is scored on `test_data.json`; the authors' code used `val_data.json` (`--didemo_split val`)"
        )
    frames = sorted({c["frames"] for c in configs if c.get("frames") not in (None, PAPER_FRAMES)})
    if frames:
        notes.append(
            f"{', '.join(map(str, frames))} frame(s) per video; the paper's rows use {PAPER_FRAMES} (`--frames "
            f"{PAPER_FRAMES}`)"
        )
    models = sorted({str(c["model"]) for c in configs if c.get("model") and c["model"] != PAPER_MODEL})
    if models:
        notes.append(f"model {', '.join(models)}; the paper's rows are ViT-B/16 (`--model {PAPER_MODEL}`)")
    if any(rec.get("precision") == "bf16" for rec in scored):
        notes.append(
            "embeddings are computed under bf16 autocast (`--precision auto` on a GPU); the authors' code ran fp32 "
            "(`--precision fp32`), which can move near-ties in the rankings"
        )
    official = {
        rec.get("num_expected")
        for rec in scored
        if _is(rec, "youcook2") and not any(Path(src).name == YOUCOOK2_CSV for src in rec.get("sources", ()))
    }
    if official:
        notes.append(
            f"YouCook2 is scored on the validation subset of the official json ({', '.join(map(str, official))} "
            f"clips); the authors' code used MIL-NCE's `{YOUCOOK2_CSV}` (3,350 clips): put it in the YouCook2 "
            "folder to score those"
        )
    if not notes:
        return []
    head = "Protocol, where it differs from the authors' code behind the paper's rows:"
    return [head, *(f"- {note}" for note in notes), ""]


def _is(rec: dict, key: str) -> bool:
    bench = benchmark_of(str(rec["dataset"]))
    return bench is not None and bench.key == key


def summary_markdown(results: list[dict], include_paper: bool = True) -> str:
    """The paper's tables (1a, 1b, 2a-c, 3) with one row per model, in the order models first appear in
    ``results``; the paper's own rows in italics when ``include_paper``; skipped datasets listed at the end."""
    models, by_model, others, skipped = _organise(results)
    notes = _Footnotes()
    lines = ["# Zero-shot results", ""]
    if include_paper:
        lines += ["Rows marked *(paper)* are the paper's figures (ViT-B/16, 4 frames); – = not evaluated/reported.", ""]
        lines += protocol_notes(results)
    else:
        lines += ["– = not evaluated.", ""]
    lines += _models_section(results, models)
    for bench in BENCHMARKS:
        if any(bench.key in by_model[m] for m in models):  # no table for a benchmark nobody ran
            lines += _benchmark_section(bench, models, by_model, notes, include_paper)
    lines += _overview_section(models, by_model, notes, include_paper)
    lines += _others_section(others, notes)
    lines += _skipped_section(skipped)
    return "\n".join(lines).rstrip("\n") + "\n"


def write_summary(out_dir: str | Path, results: list[dict]) -> Path:
    """Write :func:`summary_markdown` of ``results`` to ``OUT/summary.md`` atomically; returns the path."""
    path = Path(out_dir) / SUMMARY_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, summary_markdown(results).encode("utf-8", "backslashreplace"))  # see json_bytes
    return path


# ----- plot


def plot_alpha_sweep(points: list[dict], out_png: str | Path) -> Path:
    """Value against fusion weight alpha, one subplot per (dataset, metric) in order of first appearance.

    ``points``: ``{"alpha", "dataset", "metric", "value"}`` dicts; pass the headline metric of each dataset (see
    :func:`headline_metric`) for the paper's view. The paper's alpha = 0.4 is marked and annotated. Returns the path.
    """
    # lazy: matplotlib costs a noticeable fraction of a second to import, and most callers never plot.
    # Figure + FigureCanvasAgg directly: no pyplot, no global backend state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not points:
        raise ValueError("no points to plot: the alpha sweep produced no results")
    series: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for p in points:
        series.setdefault((str(p["dataset"]), str(p["metric"])), []).append((float(p["alpha"]), float(p["value"])))

    ncols = min(3, len(series))
    nrows = math.ceil(len(series) / ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.2 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, ((dataset, metric), xy) in zip(axes, series.items(), strict=False):
        xy.sort()
        alphas, values = zip(*xy, strict=True)
        ax.plot(alphas, values, marker="o", markersize=4, color="tab:blue")
        for a, v in xy:
            if math.isclose(a, PAPER_ALPHA, abs_tol=1e-9):
                ax.plot([a], [v], marker="*", markersize=14, color="tab:red", zorder=3)
                ax.annotate(
                    f"α={PAPER_ALPHA:g}: {format_value(v, metric)}",
                    (a, v),
                    xytext=(6, -14),
                    textcoords="offset points",
                    color="tab:red",
                    fontsize=9,
                )
        ax.set_title(f"{dataset}: {metric}")
        ax.set_xlabel("alpha (student weight)")
        ax.set_ylabel(metric)
        ax.grid(True, alpha=0.3)
    for ax in axes[len(series) :]:
        ax.set_visible(False)

    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write_bytes(out_png, buf.getvalue())
    return out_png
