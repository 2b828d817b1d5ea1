"""Monitoring: W&B (rank 0), throughput and MFU, the console progress bar.

W&B runs online when credentials exist (``WANDB_API_KEY`` or ``wandb login``)
and offline otherwise (``wandb sync RUN/wandb/offline-run-*`` uploads later).
The run's config and metrics are logged, besides what W&B records of every run
(host, command line, git commit, installed packages, system metrics). A W&B call
that fails is a warning, and the run goes on without W&B: monitoring never stops
training.
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import torch
from tqdm import tqdm

from pipeline.cli import error_line
from pipeline.writer import atomic_write_bytes
from train.config import TrainConfig

# Dense bf16 tensor-core peaks (TFLOP/s) by GPU model name (torch.cuda.get_device_name), from the vendors' datasheets;
# the first pattern found in the name wins, so a card's PCIe and NVL forms come before its SXM one
PEAK_BF16_TFLOPS = {
    r"H100 PCIe": 756.0,
    r"H[12]00 NVL": 835.0,
    r"H200|H100": 989.0,
    r"A100\b": 312.0,
    r"L40S": 362.0,
    r"L40\b": 181.0,
    r"L4\b": 121.0,
    r"A10\b": 125.0,
}


def peak_tflops(device: torch.device, override: float = 0.0) -> float:
    """Peak TFLOP/s per device for MFU: ``override`` if set, else a lookup by GPU name; 0 if unknown (CPU)."""
    if override > 0:
        return override
    if device.type != "cuda":
        return 0.0
    return datasheet_tflops(torch.cuda.get_device_name(device))


def datasheet_tflops(name: str) -> float:
    """The dense bf16 peak of the GPU called ``name`` (:data:`PEAK_BF16_TFLOPS`), 0 if it is not listed."""
    return next((v for pattern, v in PEAK_BF16_TFLOPS.items() if re.search(pattern, name)), 0.0)


def forward_flops(fn, *args) -> int:
    """FLOPs of one call (counted by torch's FlopCounterMode, no gradient)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(*args)
    return counter.get_total_flops()


def step_flops(student_fwd_per_video: int, teacher_fwd_per_video: int, labeled: int, unlabeled: int) -> int:
    """FLOPs of one FitCLIP step on one rank: student forward + backward (~3x forward) on both batches,
    teacher forward on the unlabeled batch."""
    return 3 * student_fwd_per_video * (labeled + unlabeled) + teacher_fwd_per_video * unlabeled


def wandb_mode(requested: str) -> str:
    """ "auto" -> "online" with credentials, else "offline"; "off" where W&B has no folder for its settings."""
    if requested != "auto":
        return requested
    if no_home():  # W&B could not start (online_problems); a named --wandb offline/online is refused instead
        return "off"
    return "online" if has_credentials() else "offline"


def has_credentials() -> bool:
    """W&B credentials as ``wandb login`` leaves them: ``WANDB_API_KEY``, or a netrc entry for the W&B host
    (``WANDB_BASE_URL``'s, api.wandb.ai by default)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    home = _home()
    netrc = os.environ.get("NETRC") or (home / ".netrc" if home is not None else None)
    try:
        return netrc is not None and _wandb_host() in Path(netrc).read_text()
    except OSError:
        return False


def _home() -> Path | None:
    """The user's home folder; None where there is none to find (HOME unset, and a user this machine's password
    database does not know: a container run under an arbitrary id)."""
    try:
        return Path.home()
    except (RuntimeError, KeyError):
        return None


def no_home() -> bool:
    """Whether W&B would find no folder for its settings: no home folder, and no ``WANDB_CONFIG_DIR`` (wandb.init
    then fails with "Could not determine home directory")."""
    return _home() is None and not os.environ.get("WANDB_CONFIG_DIR")


def online_problems(mode: str) -> list[str]:
    """A line if ``--wandb online`` is asked for without credentials, or W&B by name where it would find no folder
    for its settings (:func:`no_home`; ``--wandb auto`` then logs nothing, with a warning): wandb.init would refuse
    either only once the run has built its models (the trainer) or scored every model (eval.run)."""
    if mode in ("online", "offline") and no_home():
        return [
            f"--wandb {mode}: W&B keeps its settings in the home folder, and this process has none (HOME is unset, "
            "and this machine does not know the user); set HOME or WANDB_CONFIG_DIR to a folder you can write, or "
            "pass --wandb off"
        ]
    if mode != "online" or has_credentials():
        return []
    return [
        f"--wandb online: no W&B credentials found (WANDB_API_KEY, or `wandb login` for {_wandb_host()}); log in "
        "first, or pass --wandb offline (upload the run later with `wandb sync`)"
    ]


def _init_wandb(cfg: TrainConfig, mode: str):
    """``wandb.init`` of the run in OUT/wandb, resumed by the run id kept in OUT (one W&B run per training run)."""
    import wandb

    return wandb.init(
        project=cfg.wandb_project,
        name=cfg.run_name or Path(cfg.out).name,
        dir=cfg.out,
        config=cfg.to_dict(),
        mode=mode,
        resume="allow",
        id=_run_id(cfg.out),
        settings=wandb.Settings(save_code=False, console="off"),
    )


def _wandb_host() -> str:
    return urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"


class Monitor:
    """Logs from rank 0 only; every method is a no-op on other ranks."""

    def __init__(self, cfg: TrainConfig, is_main: bool, total_steps: int, start_step: int):
        self.is_main = is_main
        self.run = None
        self.bar = None
        self.warned: set[str] = set()
        self.postfix: dict[str, str] = {}  # what the progress bar shows after it
        if not is_main:
            return
        # a resume with no step left logs nothing: a W&B run then only added an empty part beside the run's own
        # (make demo's rerun), which `wandb sync` of every part lets replace the real one's history
        idle = start_step >= total_steps
        mode = "off" if idle else wandb_mode(cfg.wandb)
        if cfg.wandb == "auto" and mode == "off" and not idle:
            print(
                "warning: --wandb auto: no home folder for W&B's settings (HOME unset, a user this machine does not "
                "know): logging to W&B off; set HOME or WANDB_CONFIG_DIR to a folder you can write to log",
                file=sys.stderr,
            )
        if mode != "off":
            os.environ.setdefault("WANDB_SILENT", "true")
            try:
                self.run = _init_wandb(cfg, mode)
            except Exception as e:  # wandb's CommError after its init_timeout (90 s): no network, a proxy, a DNS
                if cfg.wandb != "auto":  # online asked for by name: the user wants to know
                    raise
                # auto chose online for the credentials it found (a cluster's compute node without network is
                # the usual case): the run goes on, logging as it would without them
                print(
                    f"warning: --wandb auto: W&B online failed ({error_line(e)}); logging offline "
                    "instead (upload later with `wandb sync`, or pass --wandb offline to skip the wait)",
                    file=sys.stderr,
                    flush=True,
                )
                import wandb

                wandb.teardown()  # its service still holds the run id of the failed init ("run ID ... is in use")
                mode = "offline"
                self.run = _init_wandb(cfg, mode)
            # Every metric is plotted against the trainer's step, logged as a metric of its own rather than as W&B's
            # step: a resumed run logs again the steps since its checkpoint, which W&B drops ("steps must be
            # monotonically increasing") when they are its own step
            self.run.define_metric(STEP_METRIC)
            self.run.define_metric("*", step_metric=STEP_METRIC)
            print(
                f"W&B: {mode} run in {cfg.out}/wandb"
                + (" (upload later with `wandb sync`)" if mode == "offline" else "")
            )
        if cfg.progress:
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def _wandb(self, call: str, *args, **kwargs) -> None:
        """``self.run.<call>(...)``; on a failure (its service gone, a full disk), a warning and no W&B from then on."""
        if self.run is None:
            return
        try:
            getattr(self.run, call)(*args, **kwargs)
        except Exception as e:
            self.run = None
            self.log_text(
                f"warning: W&B failed ({type(e).__name__}: {e}); the run goes on without it (the console and "
                "OUT/summary.json keep its figures)"
            )

    def log(self, metrics: dict, step: int) -> None:
        if not self.is_main:
            return
        self._wandb("log", {**metrics, STEP_METRIC: step})
        shown = {k: f"{v:.4g}" for k, v in metrics.items() if k in _HEADLINE}
        if self.bar is not None:
            # the last figures of both kinds side by side: a validation's replaced the bar's, its loss as "loss"
            self.postfix.update({_bar_label(k): v for k, v in shown.items()})
            self.bar.set_postfix(self.postfix, refresh=False)
        elif any(k.startswith("train/") for k in metrics):
            # --progress False (e.g. a batch job's log file): a line per log window instead (validation prints its own)
            trained = [f"{k.split('/')[-1]} {v}" for k, v in shown.items() if k.startswith("train/")]
            print(f"step {step}: train " + ", ".join(trained), flush=True)

    def log_text(self, message: str) -> None:
        if self.is_main:
            (self.bar.write if self.bar is not None else print)(message)

    def warn_once(self, key: str, message: str) -> None:
        """A warning on the console, once per run and key."""
        if key not in self.warned:
            self.warned.add(key)
            self.log_text(f"warning: {message}")

    def log_samples(self, grid: torch.Tensor, captions: list[str], step: int) -> None:
        """A grid of sample frames (3, H, W in [0, 1]) with their captions."""
        if self.is_main and self.run is not None:
            import wandb

            image = (grid.permute(1, 2, 0).numpy() * 255).astype("uint8")
            self._wandb("log", {"samples": wandb.Image(image, caption=" | ".join(captions)), STEP_METRIC: step})

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def finish(self, summary: dict | None = None, exit_code: int = 0, preempting: bool = False) -> None:
        """Close the bar and the W&B run: ``summary`` (the run's end figures) into its summary, and ``exit_code``
        (1: the run failed or was stopped) for the dashboard, which shows a run finished with 0 as a success.
        ``preempting``: saved to go on later (train.preempt), which W&B shows as preempted, not failed."""
        if preempting:
            self._wandb("mark_preempting")
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.run is not None and summary:
            try:
                self.run.summary.update(summary)
            except Exception as e:
                self.log_text(f"warning: W&B failed ({type(e).__name__}: {e}) to take the run's summary")
        self._wandb("finish", exit_code=exit_code)
        self.run = None


STEP_METRIC = "trainer/step"  # W&B's x-axis for every metric (see Monitor.__init__)
# what the console shows (the progress bar, or a line per log window): the distillation loss too, whose staying near
# its start is the README's sign of a healthy run, also with --wandb off
_HEADLINE = (
    "train/loss",
    "train/contrastive",
    "train/distillation",
    "train/videos_per_s",
    "train/mfu",
    "val/loss",
    "val/R@1",
)


def _bar_label(key: str) -> str:
    """A metric's name on the progress bar: "loss" for train/loss, "val_loss" for val/loss."""
    kind, _, name = key.rpartition("/")
    return name if kind == "train" else f"{kind}_{name}"


def _run_id(out: str) -> str:
    """A stable W&B id per run folder, so a resumed run continues the same W&B run."""
    path = Path(out) / "wandb_id.txt"
    if path.is_file():
        return path.read_text().strip()
    import uuid

    run_id = uuid.uuid4().hex[:12]
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, run_id.encode())  # a torn id would start a new W&B run on resume
    return run_id


class Timer:
    """Wall time split into waiting for data and computing, and the steps it covers, between logs."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.data = 0.0
        self.steps = 0
        self.flops = 0  # of the steps counted (their captions' widths differ: train.loop._flops_per_step)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start
