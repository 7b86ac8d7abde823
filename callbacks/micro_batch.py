"""AutoMicroBatch: ``data.batch_size: auto`` (the largest micro-batch the memory planner fits in the budget,
with the accumulation that keeps the effective batch), ``data.effective_batch_size``, and on a CUDA device a
check of the first step that backs off one size on out of memory instead of failing. At fit start, with the
accumulation final, it also says when a time-triggered checkpoint can fall inside an optimizer step.
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from lightning.pytorch.callbacks import BatchSizeFinder, ModelCheckpoint
from lightning.pytorch.tuner import batch_size_scaling
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.memory import garbage_collection_cuda

from callbacks.memory import GPUMemoryProfiler, is_out_of_memory
from phi2tutor.errors import Phi2TutorError
from phi2tutor.keys import AUTO_MICRO_BATCH_STATE_KEY
from phi2tutor.memory.planner import (
    AUTO_BATCH,
    MB,
    MicroBatchChoice,
    accumulation_for,
    auto_budget,
    choose_micro_batch,
    effective_batch_size,
    plan_from_hparams,
    smaller_micro_batch,
)

# Lightning's batch-size finder mechanics (its module functions; "__" names are not mangled outside a class).
_dump_params = getattr(batch_size_scaling, "__scale_batch_dump_params")
_reset_params = getattr(batch_size_scaling, "__scale_batch_reset_params")
_restore_params = getattr(batch_size_scaling, "__scale_batch_restore_params")
# The module's own hooks of a training run: the check's step is not one (TutorModule saves its adapter at
# on_train_end).
_SILENCED_MODULE_HOOKS = ("on_train_start", "on_train_end", "on_train_epoch_start", "on_train_epoch_end")


def _no_op(*args: Any, **kwargs: Any) -> None:
    return None


class AutoMicroBatch(BatchSizeFinder):
    """Resolve ``data.batch_size: auto`` and ``data.effective_batch_size`` when fit (or an evaluation) sets up,
    and check the first step on a CUDA device.

    At setup: the effective batch is ``data.effective_batch_size``, or (with ``auto`` and none given) the
    config's accumulation at micro-batch 1, trainer.accumulate_grad_batches x devices x nodes. ``auto`` is the
    largest micro-batch that the memory planner (phi2tutor.memory.planner.choose_micro_batch) puts at least
    AUTO_BATCH_MARGIN under the budget and that divides the effective batch's share of each device; the budget
    is GPUMemoryProfiler's budget_mb, capped by the CUDA device's total memory (auto_budget). Then
    trainer.accumulate_grad_batches = effective / (micro-batch x devices x nodes). The numbers are printed,
    written into the datamodule's hyperparameters (so into checkpoints), config.yaml and run.json.

    At fit start on one CUDA device, when auto chose the size: Lightning's BatchSizeFinder mechanics (a
    checkpoint of the state, callbacks and logger set aside, one optimizer step, state restored) run the
    first step on the longest training examples, two micro-batches accumulated; on CUDA out of memory the
    micro-batch backs off to the next smaller size that divides the effective batch and the step is tried
    again, down to 1. No search upwards: the planner already gave the size. The run then starts from the
    restored state (weights, optimizer, random generators) with the size that fitted.

    phi2tutor's commands add it to every run; it does nothing when neither option is used.
    """

    def __init__(self) -> None:
        super().__init__(steps_per_trial=1, init_val=1)
        self._record: dict[str, Any] = {}
        self._per_device: int | None = None
        self._check_pending = False

    @property
    def state_key(self) -> str:
        return AUTO_MICRO_BATCH_STATE_KEY

    # ------------------------------------------------------------------ setup: the numbers
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str | None = None) -> None:
        # BatchSizeFinder.setup refuses distributed runs and needs a batch_size attribute: not its search here.
        self._check_pending = False
        hparams = getattr(trainer.datamodule, "hparams", None)
        if hparams is None or "batch_size" not in hparams:
            return
        auto = hparams.batch_size == AUTO_BATCH
        configured_effective = hparams.get("effective_batch_size")
        configured_accumulation = trainer.accumulate_grad_batches
        self._record = {
            "auto": auto,
            "configured": {
                "batch_size": hparams.batch_size,
                "effective_batch_size": configured_effective,
                "accumulate_grad_batches": configured_accumulation,
            },
        }
        if not auto and (configured_effective is None or stage != "fit"):
            return
        replicas = trainer.world_size
        effective, source = effective_batch_size(configured_effective, configured_accumulation, replicas)
        self._record["effective_batch_size_from"] = source
        if auto:
            choice = self._choose(trainer, pl_module, hparams, effective, replicas)
            micro_batch = choice.micro_batch
        else:
            micro_batch = hparams.batch_size
        try:
            accumulation = accumulation_for(effective, micro_batch, replicas, source)
        except ValueError as error:
            raise Phi2TutorError(f"{str(error)[0].upper()}{str(error)[1:]}.") from None
        hparams.batch_size = micro_batch
        hparams.effective_batch_size = effective
        self._per_device = effective // replicas
        if stage == "fit":
            trainer.accumulate_grad_batches = accumulation
            if accumulation != configured_accumulation:
                rank_zero_info(
                    f"phi2tutor | trainer.accumulate_grad_batches {configured_accumulation} -> {accumulation}: "
                    f"effective batch {effective} ({source}) = micro-batch {micro_batch} x accumulation "
                    f"{accumulation} x {replicas} device(s)"
                )
            self._check_pending = auto and not trainer.ckpt_path

    def _choose(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, hparams: Any, effective: int, replicas: int
    ) -> MicroBatchChoice:
        device = trainer.strategy.root_device
        device_mb = (
            torch.cuda.get_device_properties(device).total_memory / MB if device.type == "cuda" else None
        )
        profiler = next((cb for cb in trainer.callbacks if isinstance(cb, GPUMemoryProfiler)), None)
        budget_mb, budget_from = auto_budget(profiler.budget_mb if profiler else None, device_mb)
        try:
            estimate = plan_from_hparams(
                pl_module.hparams,
                {**hparams, "batch_size": 1},
                str(trainer.precision),
                trainer.accumulate_grad_batches,
                source="data.batch_size auto",
            )
            choice = choose_micro_batch(estimate, budget_mb, effective, replicas)
        except ValueError as error:
            raise Phi2TutorError(f"data.batch_size auto: {error}.") from None
        self._record.update(choice=choice.to_dict(), budget_from=budget_from)
        message = f"phi2tutor | data.batch_size auto ({budget_mb:.0f} MB budget: {budget_from}): {choice.describe()}"
        if choice.fits:
            rank_zero_info(message)
        else:
            rank_zero_warn(message)
        return choice

    # ------------------------------------------------------------------ fit start: the first step
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_first_step(trainer, pl_module)
        # The accumulation is final here (resolved at setup, backed off in the first-step check).
        for line in mid_accumulation_checkpoint_notices(trainer.callbacks, trainer.accumulate_grad_batches):
            rank_zero_info(f"phi2tutor | notice: {line}")

    def _check_first_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._check_pending:
            return
        self._check_pending = False
        reason = self.unchecked_reason(trainer)
        if reason is not None:
            self._record["first_step"] = {"checked": False, "reason": reason}
            rank_zero_info(f"phi2tutor | data.batch_size auto: {reason}")
            return
        self.scale_batch_size(trainer, pl_module)

    def unchecked_reason(self, trainer: pl.Trainer) -> str | None:
        """Why the first step is not tried before the run (None: it is)."""
        if trainer.strategy.root_device.type != "cuda":
            return "no CUDA device, the first step is not checked against a real peak: the planner's size is used"
        if trainer.world_size > 1:
            return "several processes: the first step is not checked (every process would have to agree)"
        if trainer.fast_dev_run:
            return "fast_dev_run: the first step is not checked"
        return None

    # The trial as one method of BatchSizeFinder's interface: on_fit_start calls it.
    def scale_batch_size(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        datamodule = trainer.datamodule
        per_device = self._per_device or datamodule.hparams.batch_size * trainer.accumulate_grad_batches
        device = trainer.strategy.root_device
        on_cuda = device.type == "cuda"
        checkpoint_path = os.path.join(trainer.default_root_dir, f".first_step_check_{uuid.uuid4().hex}.ckpt")
        trainer.save_checkpoint(checkpoint_path)
        rng_states = _collect_rng_states(include_cuda=on_cuda)
        params = _dump_params(trainer)
        _reset_params(trainer, 1)  # no callbacks, a dummy logger, one optimizer step
        trainer.limit_val_batches = 0
        for hook in _SILENCED_MODULE_HOOKS:
            setattr(pl_module, hook, _no_op)
        datamodule.longest_first = True
        out_of_memory_at: list[int] = []
        measured_mb = None
        if trainer.progress_bar_callback:
            trainer.progress_bar_callback.disable()
        try:
            while True:
                micro_batch = datamodule.hparams.batch_size
                # Two micro-batches: the second runs with the first one's gradients held, as accumulation does.
                trainer.accumulate_grad_batches = min(per_device // micro_batch, 2)
                garbage_collection_cuda()
                batch_size_scaling._reset_progress(trainer)
                batch_size_scaling._reset_dataloaders(trainer)
                if on_cuda:
                    torch.cuda.reset_peak_memory_stats(device)
                try:
                    batch_size_scaling._try_loop_run(trainer, params)
                    break
                except Exception as error:
                    smaller = smaller_micro_batch(per_device, micro_batch)
                    if not is_out_of_memory(error) or smaller is None:
                        raise
                    out_of_memory_at.append(micro_batch)
                    datamodule.hparams.batch_size = smaller
                # Out of the except block, the error's frames (and the tensors they hold) are released.
                pl_module.zero_grad(set_to_none=True)
                garbage_collection_cuda()
                rank_zero_warn(
                    f"phi2tutor | data.batch_size auto: CUDA out of memory in the first step at micro-batch "
                    f"{micro_batch}; backing off to {smaller}"
                )
            if on_cuda:
                measured_mb = torch.cuda.max_memory_allocated(device) / MB
        finally:
            datamodule.longest_first = False
            for hook in _SILENCED_MODULE_HOOKS:
                pl_module.__dict__.pop(hook, None)
            trainer.accumulate_grad_batches = per_device // datamodule.hparams.batch_size
            # Callbacks and logger back; the data loaders rebuilt at the new size.
            _restore_params(trainer, params)
            # Written by this process a moment ago: trusted, and it holds the hyperparameters' objects.
            trainer._checkpoint_connector.restore(checkpoint_path, weights_only=False)
            trainer.strategy.remove_checkpoint(checkpoint_path)
            _set_rng_states(rng_states)
            trainer._logger_connector.reset_results()  # the check's logged values are not the run's
            trainer._logger_connector.reset_metrics()
            if trainer.progress_bar_callback:
                trainer.progress_bar_callback.enable()
        self._record_first_step(trainer, pl_module, out_of_memory_at, measured_mb)

    def _record_first_step(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        out_of_memory_at: list[int],
        measured_mb: float | None,
    ) -> None:
        datamodule = trainer.datamodule
        micro_batch = datamodule.hparams.batch_size
        train = getattr(datamodule, "datasets", {}).get("train")
        longest = max((len(example.input_ids) for example in train.examples), default=None) if train else None
        self.optimal_batch_size = micro_batch
        self._record["first_step"] = {
            "checked": True,
            "out_of_memory_at": out_of_memory_at,
            "micro_batch": micro_batch,
            "longest_example_tokens": longest,
            "measured_peak_allocated_mb": None if measured_mb is None else round(measured_mb, 1),
        }
        measured = f"peak {measured_mb:.0f} MB allocated" if measured_mb is not None else "peak not measured"
        backed = f" after out of memory at {out_of_memory_at}" if out_of_memory_at else ""
        rank_zero_info(
            f"phi2tutor | data.batch_size auto: first step checked at micro-batch {micro_batch}{backed} on the "
            f"longest training examples ({longest} tokens): {measured}; micro-batch {micro_batch} x "
            f"accumulation {trainer.accumulate_grad_batches}"
        )
        if out_of_memory_at:
            # config.yaml was written at setup with the size before the back-off.
            for callback in trainer.callbacks:
                save = getattr(callback, "save_resolved_config", None)
                if callable(save):
                    save(trainer)

    # ------------------------------------------------------------------ the record
    def run_record(self, trainer: pl.Trainer) -> dict[str, Any]:
        """run.json's ``micro_batch``: the numbers the run trains with, and how auto decided them."""
        return {**batch_numbers(trainer), **self._record}

    def state_dict(self) -> dict[str, Any]:
        return {"record": self._record}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # How the run's numbers were decided when it started (a resumed run reuses them: phi2tutor.resume).
        self._record = dict(state_dict.get("record") or self._record)

    # BatchSizeFinder searches at every evaluation start too: not here.
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        return None

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        return None

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        return None


def mid_accumulation_checkpoint_notices(callbacks: Sequence[Any], accumulate_grad_batches: int) -> list[str]:
    """What a time-triggered ModelCheckpoint cannot promise with gradient accumulation: Lightning checks
    train_time_interval after every micro-batch, so it can save between the micro-batches of one optimizer
    step, and the gradients accumulated so far are not part of a checkpoint."""
    if accumulate_grad_batches <= 1:
        return []
    return [
        f"ModelCheckpoint(train_time_interval={callback._train_time_interval}) can save between the "
        f"{accumulate_grad_batches} micro-batches of one optimizer step (trainer.accumulate_grad_batches "
        f"{accumulate_grad_batches}), and a checkpoint holds no accumulated gradients: a run resumed from "
        "such a checkpoint trains that step on fewer micro-batches, not exactly as uninterrupted. "
        "every_n_train_steps saves only after complete optimizer steps."
        for callback in callbacks
        if isinstance(callback, ModelCheckpoint) and callback._train_time_interval is not None
    ]


def optimizer_steps_per_epoch(trainer: pl.Trainer) -> int | None:
    """Optimizer steps in an epoch: the epoch's micro-batches (limit_train_batches applied) over the
    accumulation, the last step shorter (Lightning steps on an epoch's last batch); None when unknown."""
    batches = trainer.num_training_batches
    if not isinstance(batches, int) or batches <= 0:  # inf before the loader is set up, or a stream
        return None
    return math.ceil(batches / trainer.accumulate_grad_batches)


def batch_numbers(trainer: pl.Trainer) -> dict[str, Any]:
    """The micro-batch, accumulation, processes and effective batch a run trains with."""
    batch_size = getattr(trainer.datamodule, "hparams", {}).get("batch_size")
    accumulation = trainer.accumulate_grad_batches
    effective = batch_size * accumulation * trainer.world_size if isinstance(batch_size, int) else None
    return {
        "batch_size": batch_size,
        "accumulate_grad_batches": accumulation,
        "devices": trainer.world_size,
        "effective_batch_size": effective,
    }
