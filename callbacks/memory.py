"""GPUMemoryProfiler: GPU memory logged to TensorBoard while fit runs (the process's resident memory on
the CPU), the reference run's memory table and memory.json when it ends, a warning near the budget,
and a clear message with advice instead of a bare CUDA out-of-memory error.
"""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from phi2tutor.errors import attach_explanation, check_option, first_line
from phi2tutor.keys import MEMORY_JSON, MEMORY_PREFIX
from phi2tutor.memory import MB, MemoryEstimate, format_breakdown_table, ways_to_fit
from phi2tutor.report.text import fitting_advice

SNAPSHOT_FILE = "memory_snapshot.pickle"
SNAPSHOT_MAX_ENTRIES = 100_000
PEAK_KEYS = ("max_allocated_mb", "cpu_peak_rss_mb")


class MemoryBudgetWarning(UserWarning):
    """The memory peak came close to the budget."""


def cpu_rss_mb() -> float | None:
    """Resident memory of this process now, in MB (Linux /proc; None elsewhere)."""
    try:
        with open("/proc/self/statm") as statm:
            resident_pages = int(statm.read().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / MB


def cpu_peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in kilobytes on Linux, in bytes on macOS.
    peak_mb = peak / MB if sys.platform == "darwin" else peak / 1024
    # Linux updates the high-water mark lazily: the current RSS can be above it.
    return max(peak_mb, cpu_rss_mb() or 0.0)


def is_out_of_memory(exception: BaseException) -> bool:
    """A CUDA out-of-memory error, including the RuntimeError form some extensions raise."""
    if isinstance(exception, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exception, RuntimeError) and "CUDA out of memory" in str(exception)


def memory_table(record: dict[str, Any]) -> str:
    """The reference run's "GPU memory" table (allocated, reserved, max allocated) with the budget.

    On the CPU the process's resident and peak resident memory take the GPU rows' place.
    """
    budget = record["budget_mb"]
    if record["max_allocated_mb"] is not None:
        rows = [
            ("Allocated", record["allocated_mb"]),
            ("Reserved", record["reserved_mb"]),
            ("Max allocated", record["max_allocated_mb"]),
        ]
        title = f"GPU memory ({record['device']}), budget {budget:.0f} MB"
    else:
        rows = [("CPU resident", record["cpu_rss_mb"]), ("CPU peak resident", record["cpu_peak_rss_mb"])]
        title = f"Memory (no CUDA device: process resident memory), budget {budget:.0f} MB"
    lines = [
        title,
        "| Memory type       |  Size (MB) | % of budget |",
        "|-------------------|------------|-------------|",
    ]
    for name, value_mb in rows:
        if value_mb is None:
            lines.append(f"| {name:<17} | {'n/a':>10} | {'n/a':>11} |")
        else:
            lines.append(f"| {name:<17} | {value_mb:>10.2f} | {100 * value_mb / budget:>10.1f}% |")
    return "\n".join(lines)


def _advice(settings: dict[str, Any] | None) -> list[str]:
    """Concrete ways to lower the peak, mentioning the current values when the plan knows them (the same
    words as the report's)."""
    return fitting_advice(ways_to_fit(settings))


class GPUMemoryProfiler(Callback):
    def __init__(
        self,
        every_n_steps: int = 10,
        budget_mb: float = 4096.0,
        warn_fraction: float = 0.9,
        snapshot_steps: int = 0,
    ) -> None:
        """Measure GPU memory during fit and explain it against a budget.

        Args:
            every_n_steps: Log ``memory/allocated_mb``, ``memory/reserved_mb`` and
                ``memory/max_allocated_mb`` every this many optimizer steps (on the CPU:
                ``memory/cpu_rss_mb`` and ``memory/cpu_peak_rss_mb``).
            budget_mb: Memory of the card the run must fit, in MB (4096 for a 4 GB GTX 1050 Ti).
            warn_fraction: Warn once when the peak passes this fraction of ``budget_mb``.
            snapshot_steps: Record CUDA allocations of the first this many steps and write
                ``memory_snapshot.pickle`` to the run directory (open it at
                https://pytorch.org/memory_viz). 0 turns it off; CUDA only.
        """
        super().__init__()
        for name, value, valid, requirement in (
            ("every_n_steps", every_n_steps, every_n_steps >= 1, "a positive number of optimizer steps"),
            ("budget_mb", budget_mb, budget_mb > 0, "positive (the card's memory in MB, 4096 for 4 GB)"),
            ("warn_fraction", warn_fraction, 0 < warn_fraction <= 1, "in (0, 1]"),
            ("snapshot_steps", snapshot_steps, snapshot_steps >= 0, "0 (off) or a positive number of steps"),
        ):
            check_option("GPUMemoryProfiler", name, value, valid, requirement)
        self.every_n_steps = every_n_steps
        self.budget_mb = float(budget_mb)
        self.warn_fraction = warn_fraction
        self.snapshot_steps = snapshot_steps
        self.samples: list[dict[str, Any]] = []
        self.budget_warned = False
        self._device: torch.device | None = None
        self._recording = False
        self._estimate: MemoryEstimate | None = None
        self._run_directory: Path | None = None
        self._earlier_peaks: dict[str, float | None] = {}

    # ------------------------------------------------------------------ measuring
    @property
    def on_cuda(self) -> bool:
        return self._device is not None and self._device.type == "cuda"

    def measure(self) -> dict[str, Any]:
        """Current memory numbers in MB (rounded to 2 decimals, as the table prints them)."""
        record: dict[str, Any] = {
            "allocated_mb": None,
            "reserved_mb": None,
            "max_allocated_mb": None,
            "cpu_rss_mb": _round(cpu_rss_mb()),
            "cpu_peak_rss_mb": _round(cpu_peak_rss_mb()),
        }
        if self.on_cuda:
            record["allocated_mb"] = _round(torch.cuda.memory_allocated(self._device) / MB)
            record["reserved_mb"] = _round(torch.cuda.memory_reserved(self._device) / MB)
            record["max_allocated_mb"] = _round(torch.cuda.max_memory_allocated(self._device) / MB)
        for key in PEAK_KEYS:  # over every segment of a resumed run
            record[key] = _max(record[key], self._earlier_peaks.get(key))
        return record

    def peak_mb(self, record: dict[str, Any]) -> float:
        # On the CPU the process's peak resident memory stands in for the GPU peak.
        return record["max_allocated_mb"] if self.on_cuda else record["cpu_peak_rss_mb"]

    def summary(self, trainer: Trainer) -> dict[str, Any]:
        """The content of memory.json."""
        record = self.measure()
        summary = {
            "device": torch.cuda.get_device_name(self._device) if self.on_cuda else "cpu",
            "budget_mb": self.budget_mb,
            **record,
            "percent_of_budget": round(100 * self.peak_mb(record) / self.budget_mb, 1),
            "global_step": trainer.global_step,
            "samples": list(self.samples),
            "oom": False,
        }
        if self._estimate is not None:
            summary["estimate"] = self._estimate.to_dict(self.budget_mb)
        return summary

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        # Read once here, on every process: under DDP trainer.log_dir is a collective (a broadcast from
        # rank 0), so asking for it later on rank 0 alone (or in an exception handler) would hang.
        self._run_directory = Path(trainer.log_dir or trainer.default_root_dir)
        # A resumed run gets its samples back from the checkpoint after this hook (load_state_dict).
        self.samples, self.budget_warned, self._earlier_peaks = [], False, {}
        self._device = trainer.strategy.root_device
        if self.on_cuda:
            torch.cuda.reset_peak_memory_stats(self._device)
            if self.snapshot_steps > 0:
                # Started before the model is loaded, so the snapshot shows the weights arrive too.
                torch.cuda.memory._record_memory_history(max_entries=SNAPSHOT_MAX_ENTRIES)
                self._recording = True
        elif self.snapshot_steps > 0:
            rank_zero_warn("GPUMemoryProfiler: snapshot_steps needs a CUDA device; no snapshot is written.")

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._estimate = self._planner_estimate(trainer, pl_module)
        if self._estimate is not None:
            rank_zero_info(format_breakdown_table(self._estimate, self.budget_mb))

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx
    ) -> None:
        step = trainer.global_step
        if self._recording and step >= self.snapshot_steps:
            self._dump_snapshot(trainer)
        # With gradient accumulation several batches end at the same optimizer step: sample once.
        if step == 0 or step % self.every_n_steps or (self.samples and self.samples[-1]["step"] == step):
            return
        record = self.measure()
        self.samples.append({"step": step, **record})
        if self.on_cuda:
            keys = ("allocated_mb", "reserved_mb", "max_allocated_mb", "cpu_rss_mb", "cpu_peak_rss_mb")
        else:
            keys = ("cpu_rss_mb", "cpu_peak_rss_mb")
        metrics = {f"{MEMORY_PREFIX}{key}": record[key] for key in keys if record[key] is not None}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        self._check_budget(record)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._recording:
            self._dump_snapshot(trainer)
        summary = self.summary(trainer)
        self._check_budget(summary)
        if trainer.is_global_zero:
            self._write_json(trainer, summary)
            rank_zero_info(memory_table(summary))

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # Never raise here: Lightning would skip the other callbacks' on_exception (the report) and the
        # teardown. memory.json is written, the explanation rides on the original error, which propagates;
        # the phi2tutor command prints the explanation. No checkpoint is written or touched.
        try:
            if self._recording:
                self._dump_snapshot(trainer)
            if not is_out_of_memory(exception):
                return
            summary = self.summary(trainer)
            message = self.out_of_memory_message(trainer, summary, exception)
            # What the report states of the failure: where, and the ways to fit (its own words, en or es).
            summary.update(
                oom=True,
                oom_step=trainer.global_step,
                oom_epoch=trainer.current_epoch + 1,
                ways_to_fit=ways_to_fit(self._estimate.settings if self._estimate else None),
                message=message,
            )
            if trainer.is_global_zero:
                self._write_json(trainer, summary)
            attach_explanation(exception, message)
        except Exception as error:  # recording the failure must not hide it
            rank_zero_warn(
                f"GPUMemoryProfiler: could not record the memory state after {exception!r}: {error}"
            )

    # ------------------------------------------------------------------ messages
    def out_of_memory_message(
        self, trainer: Trainer, summary: dict[str, Any], exception: BaseException
    ) -> str:
        peak = self.peak_mb(summary)
        where = "the GPU's peak allocated" if self.on_cuda else "the process's peak resident memory"
        reserved = f", reserved {summary['reserved_mb']:.0f} MB" if summary["reserved_mb"] is not None else ""
        lines = [
            f"CUDA ran out of memory at step {trainer.global_step} (epoch {trainer.current_epoch + 1}) on "
            f"{summary['device']}: {where} reached {peak:.0f} MB, {summary['percent_of_budget']:.0f}% of the "
            f"{self.budget_mb:.0f} MB budget{reserved}.",
        ]
        if self._estimate is not None:
            lines += [
                "The planner's estimate of this configuration:",
                format_breakdown_table(self._estimate, self.budget_mb),
            ]
        lines.append("Ways to fit:")
        lines += [f"  - {item}" for item in _advice(self._estimate.settings if self._estimate else None)]
        run_dir = self._run_dir(trainer)
        lines.append(
            f"Memory record: {run_dir / MEMORY_JSON}. No checkpoint was written or changed: the last one "
            "saved is intact; resume from it with --ckpt_path after changing the config."
        )
        lines.append(f"PyTorch said: {first_line(exception)}")
        return "\n".join(lines)

    def _check_budget(self, record: dict[str, Any]) -> None:
        peak = self.peak_mb(record)
        if self.budget_warned or peak is None or peak <= self.warn_fraction * self.budget_mb:
            return
        self.budget_warned = True
        what = "GPU max allocated" if self.on_cuda else "process peak resident memory (no CUDA device)"
        advice = "; ".join(_advice(self._estimate.settings if self._estimate else None))
        rank_zero_warn(
            f"Memory peak {peak:.0f} MB ({what}) is {100 * peak / self.budget_mb:.0f}% of the "
            f"{self.budget_mb:.0f} MB budget, past the {self.warn_fraction:.0%} warning line: a longer batch "
            f"may run out of memory. To lower it: {advice}.",
            category=MemoryBudgetWarning,
        )

    # ------------------------------------------------------------------ files
    def _run_dir(self, trainer: Trainer) -> Path:
        if self._run_directory is not None:
            return self._run_directory
        return Path(trainer.log_dir or trainer.default_root_dir)

    def _write_json(self, trainer: Trainer, summary: dict[str, Any]) -> Path:
        path = self._run_dir(trainer) / MEMORY_JSON
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=2))
        return path

    def _dump_snapshot(self, trainer: Trainer) -> None:
        self._recording = False
        if trainer.is_global_zero:
            path = self._run_dir(trainer) / SNAPSHOT_FILE
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.cuda.memory._dump_snapshot(str(path))
            rank_zero_info(
                f"GPUMemoryProfiler: CUDA memory snapshot written to {path} (https://pytorch.org/memory_viz)"
            )
        torch.cuda.memory._record_memory_history(enabled=None)

    def _planner_estimate(self, trainer: Trainer, pl_module: LightningModule) -> MemoryEstimate | None:
        """The module's ``memory_estimate``: TutorModule plans its configuration once when it is configured
        (one plan, printed there and here); other modules have none."""
        estimate = getattr(pl_module, "memory_estimate", None)
        return estimate if isinstance(estimate, MemoryEstimate) else None

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        record = self.measure()  # its peaks already include the earlier segments'
        peaks = {key: record[key] for key in PEAK_KEYS}
        return {"samples": self.samples, "budget_warned": self.budget_warned, "peaks": peaks}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.samples = list(state_dict.get("samples", []))
        self.budget_warned = bool(state_dict.get("budget_warned", False))
        # The peaks of the segments before the checkpoint: a resumed run's peak is the whole run's.
        self._earlier_peaks = dict(state_dict.get("peaks") or {})


def _max(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else max(a, b)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)
