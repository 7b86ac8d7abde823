"""Phi-2's real width through TutorModule's own training step on the CPU, every live tensor counted, beside
the memory planner term by term; the 32-layer figure extrapolated from a 2- and a 4-layer run.

What runs: a PhiForCausalLM of Phi-2's width (hidden 2560, intermediate 10240, 32 heads of 80, partial
rotary 0.4, vocab 51200) with --layers decoder layers and random fp16 weights is saved, then loaded by
TutorModule the way configs/phi2-qlora-4gb.yaml says (nf4 + double quantization, float16 compute, LoRA r 16
on the six modules, gradient checkpointing, paged 8-bit AdamW) and trained by a Lightning Trainer with
16-mixed (MixedPrecision('16-mixed', 'cpu'): fp16 autocast and a GradScaler, as benchmarks/memory_phi2.py
runs it) for two optimizer steps of micro-batch 1 x 512 tokens whose last --answer_fraction positions carry
labels. The second step (optimizer states exist, as on every step after the first) is measured.

How it counts: phi2tutor.memory.tracker.LiveTensorBytes, a TorchDispatchMode, counts every storage an op
creates until it is freed, labelled by the phase of the step that made it (forward, loss forward, loss
backward, backward of decoder layer i, optimizer step); weights, LoRA weights and optimizer states present
before the step are counted from the model and the optimizer. That is torch.cuda.max_memory_allocated
without the CUDA caching allocator's rounding.

CPU against CUDA (the planner models CUDA):
  - autocast: CUDA's autocast runs layer_norm, pow, softmax, log_softmax, sum and exp in fp32; the CPU's
    keeps them in fp16. The script applies CUDA's rule on the CPU (a TorchFunctionMode that upcasts those
    ops' inputs while autocast is on), so layer-norm outputs, bitsandbytes Linear4bit outputs (cast back
    to the input dtype, fp32 after a CUDA-autocast layer norm) and the residual stream have CUDA's widths.
    --cpu_rules measures the CPU's own rules instead.
  - dropout: the CPU's native_dropout keeps its mask in the input's dtype (fp32 here), CUDA's a bool
    mask: the script drops out with a bool mask, as CUDA does (--cpu_rules: the CPU's).
  - bitsandbytes: on the CPU dequantize_4bit and the 4-bit matmul run bitsandbytes' CPU kernels; the
    dequantized fp16 weight they build is the same size as CUDA's. The paged optimizer cannot page on the
    CPU: its states are counted as allocated here, the planner puts them in unified memory.
  - layer_norm on the CPU keeps mean/rstd in the input dtype (CUDA: fp32); with the CUDA rule above the
    input is fp32 anyway.
  - The CUDA allocator rounds blocks to 512 bytes and keeps a reserve (the planner's allocator term).

Output: the planner's and the measured bytes per phase and per group of terms, the measured peak and its
phase, per run; then the 32-layer extrapolation (a + 32 b from the 2- and 4-layer peaks) beside the
planner's 32-layer estimate. Last line:
  RESULT measured_peak_mb_32l=... planner_peak_mb=... ratio=... (planner / measured) tokens_per_s=...

    python benchmarks/memory_phi2_cpu.py                     # 2 and 4 layers at Phi-2 width, a few minutes
    python benchmarks/memory_phi2_cpu.py --reduced           # hidden 320, seconds (the smoke test's size)
    python benchmarks/memory_phi2_cpu.py --config configs/phi2-qlora-3gb.yaml
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from lightning.pytorch import Callback, Trainer  # noqa: E402
from torch.utils.data import ConcatDataset, DataLoader  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory_phi2 import (  # noqa: E402
    MODEL_FIELDS,
    PHI2_SHAPE,
    SMALL_SHAPE,
    RandomAnswerBatches,
    planner_estimate,
    read_config,
    trainer_precision_args,
    write_random_checkpoint,
)

from phi2tutor import offload as phi2tutor_offload  # noqa: E402
from phi2tutor.loading import bundled_tokenizer_dir  # noqa: E402
from phi2tutor.memory import MB, MemoryEstimate  # noqa: E402
from phi2tutor.memory.tracker import (  # noqa: E402
    LiveTensorBytes,
    frozen_model_tensors,
    optimizer_state_tensors,
    storage_bytes,
)
from phi2tutor.model import TutorModule  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "phi2-qlora-4gb.yaml"
# Phi-2's proportions at a width that runs in seconds (memory_phi2.py's small Phi, vocab 4096): the smoke
# test's size. Each run sets its own number of layers.
REDUCED_SHAPE: dict[str, Any] = {**SMALL_SHAPE, "vocab_size": 4096}
WARMUP_LENGTH = 16  # tokens of the first, unmeasured step
PHASE_FORWARD = "forward"
PHASE_LOSS_FORWARD = "loss forward"
PHASE_LOSS_BACKWARD = "loss backward"
PHASE_OPTIMIZER = "optimizer step"
PREVIOUS_GRADIENTS = "gradients of the previous step"
GRADIENTS = "gradients"
CREATED_IN_THIS_LAYER = "created in this layer's backward"


def layer_phase(index: int) -> str:
    return f"backward of decoder layer {index}"


# --------------------------------------------------------------------------- CUDA's autocast rule
# (namespace, attribute) of the ops in CUDA's autocast fp32 list that a Phi training step calls.
_FP32_UNDER_CUDA_AUTOCAST = [
    (F, "layer_norm"),
    (torch, "layer_norm"),
    (torch, "pow"),
    (torch.Tensor, "pow"),
    (torch.Tensor, "__pow__"),
    (F, "softmax"),
    (torch, "softmax"),
    (torch.Tensor, "softmax"),
    (F, "log_softmax"),
    (torch, "log_softmax"),
    (torch.Tensor, "log_softmax"),
]


def _fp32_under_autocast(function):
    def wrapper(*args, **kwargs):
        values = [*args, *kwargs.values()]
        if torch.is_autocast_enabled("cpu") and any(
            isinstance(v, torch.Tensor) and v.dtype == torch.float16 for v in values
        ):

            def up(value):
                return (
                    value.float()
                    if isinstance(value, torch.Tensor) and value.dtype == torch.float16
                    else value
                )

            with torch.autocast("cpu", enabled=False):
                return function(*[up(a) for a in args], **{k: up(v) for k, v in kwargs.items()})
        return function(*args, **kwargs)

    return wrapper


def _dropout_with_bool_mask(function):
    def dropout(input, p=0.5, training=True, inplace=False):
        if not training or p <= 0 or p >= 1 or inplace or input.device.type != "cpu":
            return function(input, p, training, inplace)
        # CUDA's native_dropout keeps a 1-byte mask; the CPU's keeps one in the input's dtype.
        mask = torch.empty(input.shape, dtype=torch.bool, device=input.device).bernoulli_(1 - p)
        return input * mask * (1.0 / (1 - p))

    return dropout


class CudaRules:
    """CUDA's behaviour where the CPU's differs in what a step keeps: while CPU autocast is on, the ops
    of CUDA's autocast fp32 list run in fp32; dropout keeps a bool mask as CUDA's does.

    The functions are replaced for the duration (a TorchFunctionMode would be switched off inside
    ``backward``, where checkpointed layers are recomputed)."""

    def __enter__(self) -> CudaRules:
        self._saved = [(owner, name, getattr(owner, name)) for owner, name in _FP32_UNDER_CUDA_AUTOCAST]
        self._saved.append((F, "dropout", F.dropout))
        for owner, name, function in self._saved[:-1]:
            setattr(owner, name, _fp32_under_autocast(function))
        F.dropout = _dropout_with_bool_mask(F.dropout)
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, function in self._saved:
            setattr(owner, name, function)


_MATMULS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten.baddbmm.default,
}


class FastFp16MatmulTracker(LiveTensorBytes):
    """LiveTensorBytes whose fp16 matrix products run in fp32 and are rounded back: the CPU has no fast
    fp16 GEMM (a 512 x 2560 x 10240 product takes 4.8 s in fp16 against 1.0 s in fp32 on one core).
    The fp32 temporaries are not counted (a CUDA fp16 GEMM accumulates in fp32 without them); the fp16
    result is, as the fp16 product's would be."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _MATMULS and any(
            isinstance(a, torch.Tensor) and a.dtype == torch.float16 and a.device.type == "cpu" for a in args
        ):
            # Inside its own handler the mode is off: these ops are not counted.
            up = [a.float() if isinstance(a, torch.Tensor) else a for a in args]
            out = func(*up, **kwargs).to(torch.float16)
            self._track(out, str(func.overloadpacket.__name__))
            return out
        return super().__torch_dispatch__(func, types, args, kwargs)


@contextlib.contextmanager
def host_offload_as_on_cuda(probe: StepMemoryProbe, device: torch.device) -> Iterator[None]:
    """phi2tutor.offload.saved_tensors_on_host as it behaves on CUDA, on the CPU: each saved tensor's
    copy stands for the pinned host copy (not counted), and the backward's copy back is counted."""
    tracker = probe.tracker
    if tracker is None:
        yield
        return

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        with tracker.paused():
            return tensor.clone()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda host: host.clone()):
        yield


# --------------------------------------------------------------------------- the probe
@dataclass
class StepMeasurement:
    """What the measured step held, in bytes."""

    layers: int
    weights: int  # frozen base: parameters, quantization state, buffers
    trainable: int  # LoRA weights (and modules_to_save copies)
    optimizer_states: int
    gradients: int
    peak: int
    peak_phase: str
    phase_peaks: dict[str, int]
    # phase -> (category of the live tensors -> bytes) at that phase's peak
    phase_breakdown: dict[str, dict[str, int]]
    seconds: float = math.nan
    tokens: int = 0
    loss: float = math.nan
    # phase -> ((phase that created it, op or kind) -> bytes) at that phase's peak, the largest first
    details: dict[str, list[tuple[tuple[str, str], int]]] = field(default_factory=dict)


def category(created_in: str, kind: str, phase: str) -> str:
    """Group a storage alive at ``phase``'s peak by the phase that made it (gradients by what they are)."""
    if kind in (GRADIENTS, PREVIOUS_GRADIENTS):
        return kind
    if created_in == phase and phase.startswith("backward of decoder layer"):
        return CREATED_IN_THIS_LAYER
    return f"created in {created_in}"


class StepMemoryProbe(Callback):
    """Counts live tensors through one training step (``measured_batch``), phase by phase."""

    def __init__(self, measured_batch: int, cuda_rules: bool, fast_matmul: bool = True) -> None:
        self.measured_batch = measured_batch
        self.fast_matmul = fast_matmul
        self.cuda_rules = cuda_rules
        self.tracker: LiveTensorBytes | None = None
        self.result: StepMeasurement | None = None
        self._handles: list[Any] = []
        self._saved_offload = None
        self._static: dict[str, int] = {}
        self._started = 0.0
        self._always_rule: CudaRules | None = None

    def on_train_start(self, trainer: Trainer, pl_module: TutorModule) -> None:
        if pl_module.hparams.get("offload_checkpoints"):
            self._saved_offload = phi2tutor_offload.saved_tensors_on_host
            phi2tutor_offload.saved_tensors_on_host = lambda device: host_offload_as_on_cuda(self, device)
        base = pl_module.model.get_base_model()
        layers = base.model.layers
        for index, layer in enumerate(layers):
            pre_hook, hook = self._layer_hook(index)
            self._handles.append(layer.register_forward_pre_hook(pre_hook))
            self._handles.append(layer.register_forward_hook(hook))
        self._handles.append(base.model.final_layernorm.register_forward_pre_hook(self._loss_forward_hook))
        if self.cuda_rules:
            # Every step, not only the measured one, so the first step's states match CUDA's too.
            self._always_rule = CudaRules()
            self._always_rule.__enter__()

    def on_train_end(self, trainer: Trainer, pl_module: TutorModule) -> None:
        if self._saved_offload is not None:
            phi2tutor_offload.saved_tensors_on_host = self._saved_offload
        for handle in self._handles:
            handle.remove()
        if self._always_rule is not None:
            self._always_rule.__exit__(None, None, None)
            self._always_rule = None

    def _layer_hook(self, index: int):
        def pre_hook(module, args):
            if self.tracker is not None and self.tracker.phase in (PHASE_FORWARD, "start"):
                self.tracker.set_phase(PHASE_FORWARD)

        def hook(module, args, output):
            # The gradient of a layer's output is ready when autograd reaches that layer: its backward
            # (with checkpointing: the recompute, then the backward) starts.
            hidden = output[0] if isinstance(output, tuple) else output
            if self.tracker is not None and self.tracker.phase == PHASE_FORWARD and hidden.requires_grad:
                hidden.register_hook(lambda grad: self._enter(layer_phase(index)))

        return pre_hook, hook

    def _enter(self, phase: str) -> None:
        if self.tracker is not None:
            self.tracker.set_phase(phase)

    def _loss_forward_hook(self, module, args) -> None:
        if self.tracker is not None and self.tracker.phase == PHASE_FORWARD:
            self.tracker.set_phase(PHASE_LOSS_FORWARD)

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: TutorModule, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx != self.measured_batch:
            return
        gc.collect()
        model = pl_module.model
        optimizer = trainer.optimizers[0]
        trainable = [p for p in model.parameters() if p.requires_grad]
        frozen = list(frozen_model_tensors(model))
        states = list(optimizer_state_tensors(optimizer))
        self._static = {
            "weights": storage_bytes(frozen),
            "trainable": storage_bytes(trainable),
            "optimizer_states": storage_bytes(states),
        }
        tracker_class = FastFp16MatmulTracker if self.fast_matmul else LiveTensorBytes
        self.tracker = tracker_class(baseline=frozen + trainable + states)
        if self.tracker.baseline_bytes != sum(self._static.values()):
            raise RuntimeError("weights, trainable weights and optimizer states share storage")
        # Lightning zeroes gradients after the training step's forward: the previous step's are alive
        # until then. Count them as live tensors, freed when zero_grad drops them.
        self.tracker.adopt(
            [p.grad for p in trainable if p.grad is not None], "previous step", PREVIOUS_GRADIENTS
        )
        self.tracker.set_phase(PHASE_FORWARD)
        self._started = time.perf_counter()
        self.tracker.__enter__()

    def on_before_backward(self, trainer: Trainer, pl_module: TutorModule, loss: torch.Tensor) -> None:
        if self.tracker is not None:
            self.tracker.set_phase(PHASE_LOSS_BACKWARD)

    def on_after_backward(self, trainer: Trainer, pl_module: TutorModule) -> None:
        if self.tracker is not None:
            grads = [p.grad for p in pl_module.model.parameters() if p.requires_grad and p.grad is not None]
            self.tracker.mark(grads, GRADIENTS)
            self._static["gradients"] = storage_bytes(grads)
            self.tracker.set_phase(PHASE_OPTIMIZER)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: TutorModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        tracker = self.tracker
        if tracker is None or batch_idx != self.measured_batch:
            return
        tracker.__exit__(None, None, None)
        seconds = time.perf_counter() - self._started
        self.tracker = None
        layers = len(pl_module.model.get_base_model().model.layers)
        phase_breakdown: dict[str, dict[str, int]] = {}
        details: dict[str, list[tuple[tuple[str, str], int]]] = {}
        for phase, peak in tracker.peaks.items():
            detail = tracker.breakdown(peak.alive_ids)
            groups: dict[str, int] = {}
            for (created_in, kind), nbytes in detail.items():
                name = category(created_in, kind, phase)
                groups[name] = groups.get(name, 0) + nbytes
            phase_breakdown[phase] = groups
            details[phase] = sorted(detail.items(), key=lambda item: -item[1])
        loss = trainer.callback_metrics.get("train/loss")
        self.result = StepMeasurement(
            layers=layers,
            weights=self._static["weights"],
            trainable=self._static["trainable"],
            optimizer_states=self._static["optimizer_states"],
            gradients=self._static.get("gradients", 0),
            peak=tracker.peak_bytes,
            peak_phase=tracker.peak_phase,
            phase_peaks={phase: peak.peak_bytes for phase, peak in tracker.peaks.items()},
            phase_breakdown=phase_breakdown,
            seconds=seconds,
            tokens=int(batch["attention_mask"].sum()),
            loss=float(loss) if loss is not None else math.nan,
            details=details,
        )


# --------------------------------------------------------------------------- running
def measure(
    shape: dict[str, Any],
    model_settings: dict[str, Any],
    trainer_config: dict[str, Any],
    max_length: int,
    answer_positions: int,
    cuda_rules: bool,
    seed: int,
    work_dir: Path,
) -> StepMeasurement:
    """Save a random model of ``shape``, load it with TutorModule, train two steps, measure the second."""
    checkpoint_dir = work_dir / f"random-phi-{shape['num_hidden_layers']}l"
    # In this process: the tracker counts tensors, not the process's memory, and a child costs seconds.
    write_random_checkpoint(shape, str(checkpoint_dir), "cpu", seed)
    gc.collect()
    module = TutorModule(
        model_name_or_path=str(checkpoint_dir),
        tokenizer_name_or_path=str(bundled_tokenizer_dir()),  # ids are random; any tokenizer will do
        init_seed=seed,
        **model_settings,
    )
    steps = 2
    # The first step only has to create the optimizer states, whose size does not depend on the length.
    batches = ConcatDataset(
        [
            RandomAnswerBatches(1, WARMUP_LENGTH, shape["vocab_size"], WARMUP_LENGTH // 2, seed),
            RandomAnswerBatches(1, max_length, shape["vocab_size"], answer_positions, seed),
        ]
    )
    probe = StepMemoryProbe(measured_batch=steps - 1, cuda_rules=cuda_rules)
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        accumulate_grad_batches=1,
        gradient_clip_val=trainer_config.get("gradient_clip_val"),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=str(work_dir),
        callbacks=[probe],
        **trainer_precision_args(str(trainer_config.get("precision", "32-true")), on_cuda=False),
    )
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=1, shuffle=False))
    if probe.result is None:
        raise RuntimeError("the measured step did not run")
    result = probe.result
    del trainer, module
    gc.collect()
    return result


# --------------------------------------------------------------------------- the comparison
# The planner's term functions, by the measured group they correspond to.
PLANNER_GROUPS = {
    "frozen_weights": "frozen weights",
    "trainable_weights": "trainable weights",
    "optimizer_states": "optimizer states",
    "previous_step_gradients": "gradients",
    "accumulated_gradients": "gradients",
    "last_layer_gradients": "gradients",
    "all_gradients": "gradients",
    "gradients_before_first_layer": "gradients",
    "kept_activations": f"created in {PHASE_FORWARD}",
    "kept_for_first_layer": f"created in {PHASE_FORWARD}",
    "forward_only": f"created in {PHASE_FORWARD}",
    "final_norm_kept": f"created in {PHASE_FORWARD}",  # its input: the last layer's output
    "head_forward": f"created in {PHASE_LOSS_FORWARD}",
    "logits": f"created in {PHASE_LOSS_FORWARD}",
    "log_softmax_saved": f"created in {PHASE_LOSS_FORWARD}",
    "loss_gradients": f"created in {PHASE_LOSS_BACKWARD}",
    "recompute_last_layer": CREATED_IN_THIS_LAYER,
    "recompute_first_layer": CREATED_IN_THIS_LAYER,
    "layer_backward_work": CREATED_IN_THIS_LAYER,
    "optimizer_temporaries": f"created in {PHASE_OPTIMIZER}",
    "embedding_output_and_gradient": f"created in {PHASE_FORWARD}",
}
GROUP_ORDER = [
    "frozen weights",
    "trainable weights",
    "optimizer states",
    "gradients",
    f"created in {PHASE_FORWARD}",
    f"created in {PHASE_LOSS_FORWARD}",
    f"created in {PHASE_LOSS_BACKWARD}",
    CREATED_IN_THIS_LAYER,
    f"created in {PHASE_OPTIMIZER}",
]


def planner_phase_to_measured(phase: str, layers: int) -> str:
    return {
        "backward of the last decoder layer": layer_phase(layers - 1),
        "backward of the first decoder layer": layer_phase(0),
    }.get(phase, phase)


def measured_groups(measurement: StepMeasurement, phase: str) -> dict[str, int]:
    groups = {
        "frozen weights": measurement.weights,
        "trainable weights": measurement.trainable,
        "optimizer states": measurement.optimizer_states,
    }
    for name, nbytes in measurement.phase_breakdown.get(phase, {}).items():
        if name in (GRADIENTS, PREVIOUS_GRADIENTS):
            name = "gradients"
        elif name.startswith("created in backward of decoder layer"):
            name = (
                CREATED_IN_THIS_LAYER if name == f"created in {phase}" else "created in an earlier backward"
            )
        groups[name] = groups.get(name, 0) + nbytes
    return groups


def planned_groups(estimate: MemoryEstimate, phase: str) -> dict[str, int]:
    groups: dict[str, int] = {}
    for function_name, terms in estimate.phase_groups[phase]:
        name = PLANNER_GROUPS[function_name]
        groups[name] = groups.get(name, 0) + sum(nbytes for _, nbytes in terms)
    # The CPU cannot page: paged optimizer states are allocated there, so compare them in full.
    groups["optimizer states"] = groups.get("optimizer states", 0) + estimate.paged_optimizer_state_bytes
    return groups


def comparison_table(estimate: MemoryEstimate, measurement: StepMeasurement) -> tuple[str, dict[str, float]]:
    """Per planner phase and group: planner MB, measured MB, planner / measured."""
    lines = [
        f"{measurement.layers} decoder layers | measured peak {measurement.peak / MB:.1f} MB in "
        f"'{measurement.peak_phase}' | planner peak {planner_total(estimate) / MB:.1f} MB in "
        f"'{estimate.peak_phase}' (allocated + paged optimizer states, which the CPU cannot page)",
        f"{'phase / group':<58} {'planner MB':>11} {'measured MB':>12} {'ratio':>7}",
    ]
    totals: dict[str, float] = {}
    for phase in estimate.phases:
        measured_phase = planner_phase_to_measured(phase, measurement.layers)
        planned = planned_groups(estimate, phase)
        measured = measured_groups(measurement, measured_phase)
        planned_total = sum(planned.values())
        measured_total = measurement.phase_peaks.get(measured_phase, 0)
        totals[phase] = measured_total
        lines.append(
            f"{phase + ' (measured: ' + measured_phase + ')':<58} {planned_total / MB:>11.1f} "
            f"{measured_total / MB:>12.1f} {_ratio(planned_total, measured_total):>7}"
        )
        names = GROUP_ORDER + sorted(set(measured) - set(GROUP_ORDER))
        for name in names:
            p, m = planned.get(name, 0), measured.get(name, 0)
            if p or m >= 0.05 * MB:
                lines.append(f"  {name:<56} {p / MB:>11.1f} {m / MB:>12.1f} {_ratio(p, m):>7}")
    for phase, nbytes in measurement.phase_peaks.items():
        if phase not in {planner_phase_to_measured(p, measurement.layers) for p in estimate.phases}:
            if not phase.startswith("backward of decoder layer"):
                lines.append(f"{'(measured only) ' + phase:<58} {'':>11} {nbytes / MB:>12.1f}")
    return "\n".join(lines), totals


def planner_total(estimate: MemoryEstimate, phase: str | None = None) -> int:
    phase = phase or estimate.peak_phase
    return sum(nbytes for _, nbytes in estimate.phases[phase]) + estimate.paged_optimizer_state_bytes


def _ratio(planned: float, measured: float) -> str:
    return f"{planned / measured:.3f}" if measured > 0 else "-"


def extrapolate(small: StepMeasurement, large: StepMeasurement, layers: int) -> dict[str, float]:
    """Per planner phase: bytes at ``layers`` layers, a + layers * b through the two measured runs."""
    result = {}
    for phase in (
        "loss forward",
        "loss backward",
        "backward of the last decoder layer",
        "backward of the first decoder layer",
        "optimizer step",
    ):
        a_phase, b_phase = (planner_phase_to_measured(phase, m.layers) for m in (small, large))
        y1, y2 = small.phase_peaks.get(a_phase, 0), large.phase_peaks.get(b_phase, 0)
        per_layer = (y2 - y1) / (large.layers - small.layers)
        result[phase] = y1 + (layers - small.layers) * per_layer
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config", type=Path, default=DEFAULT_CONFIG, help="YAML whose model settings are used"
    )
    parser.add_argument("--layers", type=int, nargs=2, default=(2, 4), help="decoder layers of the two runs")
    parser.add_argument(
        "--max_length", type=int, default=None, help="tokens of the example; default the config's"
    )
    parser.add_argument(
        "--answer_fraction",
        type=float,
        default=0.6,
        help="share of the positions (the last ones) that carry labels; 0.6 is a long GSM8K answer",
    )
    parser.add_argument("--reduced", action="store_true", help="hidden 320, vocab 4096: seconds (smoke test)")
    parser.add_argument(
        "--cpu_rules",
        action="store_true",
        help="the CPU's autocast and dropout instead of CUDA's (see above)",
    )
    parser.add_argument("--details", type=int, default=0, help="print the N largest live groups per phase")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: best on a busy CPU)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    for name in ("lightning.pytorch", "lightning.fabric", "transformers", "phi2tutor"):
        logging.getLogger(name).setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    config = read_config(args.config)
    model_settings = {k: v for k, v in config["model"].items() if k in MODEL_FIELDS}
    max_length = args.max_length or int(config["data"].get("max_length", 512))
    answer_positions = max(1, round(args.answer_fraction * max_length))
    # target_token_loss shifts labels by one: every labelled position but position 0 is a target.
    loss_fraction = min(answer_positions, max_length - 1) / max_length
    precision = str(config["trainer"].get("precision", "32-true"))
    width = REDUCED_SHAPE if args.reduced else PHI2_SHAPE
    print(
        f"config {args.config.name} | hidden {width['hidden_size']}, intermediate {width['intermediate_size']}, "
        f"{width['num_attention_heads']} heads, vocab {width['vocab_size']} | {model_settings.get('quantization')} "
        f"base, compute {model_settings.get('compute_dtype')}, LoRA r {model_settings.get('lora_r')}, "
        f"{model_settings.get('optimizer')}, checkpointing {model_settings.get('gradient_checkpointing')} | "
        f"precision {precision} ({'CPU' if args.cpu_rules else 'CUDA'} autocast and dropout) | micro-batch 1 x "
        f"{max_length} tokens, labels on the last {answer_positions} | threads {args.threads}",
        flush=True,
    )
    runs: list[tuple[StepMeasurement, MemoryEstimate]] = []
    with tempfile.TemporaryDirectory(prefix="phi2tutor-memory-cpu-") as work_dir:
        for layers in args.layers:
            shape = {**width, "num_hidden_layers": layers}
            started = time.perf_counter()
            measurement = measure(
                shape,
                model_settings,
                config["trainer"],
                max_length,
                answer_positions,
                not args.cpu_rules,
                args.seed,
                Path(work_dir),
            )
            estimate = planner_estimate(model_settings, shape, 1, max_length, precision, 1, loss_fraction)
            table, _ = comparison_table(estimate, measurement)
            print(table)
            if args.details:
                for phase, rows in measurement.details.items():
                    print(f"  live tensors at the peak of '{phase}' (created in, by op):")
                    for (created_in, op), nbytes in rows[: args.details]:
                        print(f"    {created_in:<30} {op:<40} {nbytes / MB:>9.2f} MB")
            print(
                f"{layers} layers: measured step {measurement.seconds:.1f} s ({measurement.tokens / measurement.seconds:.1f} "
                f"tokens/s, tracking included), run {time.perf_counter() - started:.0f} s, loss {measurement.loss:.3f}",
                flush=True,
            )
            runs.append((measurement, estimate))
    (small, _), (large, large_estimate) = runs
    full_layers = PHI2_SHAPE["num_hidden_layers"]
    full_estimate = planner_estimate(
        model_settings,
        {**width, "num_hidden_layers": full_layers},
        1,
        max_length,
        precision,
        1,
        loss_fraction,
    )
    extrapolated = extrapolate(small, large, full_layers)
    print(
        f"{full_layers} layers, extrapolated a + {full_layers} b from {small.layers} and {large.layers} layers:"
    )
    print(f"{'phase':<40} {'planner MB':>11} {'measured MB':>12} {'ratio':>7}")
    for phase, nbytes in extrapolated.items():
        planned = planner_total(full_estimate, phase)
        print(f"{phase:<40} {planned / MB:>11.1f} {nbytes / MB:>12.1f} {_ratio(planned, nbytes):>7}")
    measured_phase = max(extrapolated, key=extrapolated.__getitem__)
    measured_peak = extrapolated[measured_phase] / MB
    planner_peak = planner_total(full_estimate) / MB
    print(
        f"measured peak at {full_layers} layers {measured_peak:.1f} MB in '{measured_phase}'; planner "
        f"{planner_peak:.1f} MB in '{full_estimate.peak_phase}' ({full_estimate.estimated_peak_allocated_mb:.1f} MB "
        f"allocated on CUDA, where {full_estimate.paged_optimizer_state_bytes / MB:.1f} MB of optimizer states are paged)"
    )
    tokens_per_s = large.tokens / large.seconds
    result = {
        "measured_peak_mb_32l": measured_peak,
        "planner_peak_mb": planner_peak,
        "ratio": planner_peak / measured_peak,
        "tokens_per_s": tokens_per_s,
    }
    print(
        f"RESULT measured_peak_mb_32l={measured_peak:.1f} planner_peak_mb={planner_peak:.1f} "
        f"ratio={result['ratio']:.3f} tokens_per_s={tokens_per_s:.1f} measured_phase={measured_phase.replace(' ', '_')}"
    )
    return result


if __name__ == "__main__":
    main()
