"""Bytes of live tensors during a training step, counted on any device (the CPU included) by a
TorchDispatchMode: every storage an op creates is counted until it is freed, with the step phase that
created it; the peak, the phase it falls in and what is alive at that moment are kept. This is what
``torch.cuda.max_memory_allocated`` measures on a GPU, less the CUDA allocator's rounding. Also the
tensors a loaded model and an optimizer hold, and their bytes.

Used by benchmarks/memory_phi2_cpu.py and by the planner's tests; imports torch, not Lightning.
"""

from __future__ import annotations

import contextlib
import weakref
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages among ``tensors`` (views and repeats counted once)."""
    storages: dict[int, int] = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def frozen_model_tensors(model: torch.nn.Module) -> Iterator[torch.Tensor]:
    """Every tensor the frozen part of ``model`` holds: parameters that take no gradient, their
    bitsandbytes quantization state (4-bit absmax, codes, offset; int8 SCB row scales), buffers."""
    for parameter in model.parameters():
        if parameter.requires_grad:
            continue
        yield parameter
        state = getattr(parameter, "quant_state", None)
        if state is not None:
            yield from (t for t in (state.absmax, state.code, state.offset) if t is not None)
            if state.state2 is not None:
                yield from (state.state2.absmax, state.state2.code)
        if getattr(parameter, "SCB", None) is not None:
            yield parameter.SCB
    yield from model.buffers()


def optimizer_state_tensors(optimizer: torch.optim.Optimizer) -> Iterator[torch.Tensor]:
    """The optimizer's state tensors, less the step counters (torch keeps AdamW's on the host)."""
    for state in optimizer.state.values():
        for key, value in state.items():
            if torch.is_tensor(value) and key != "step":
                yield value


@dataclass
class _Record:
    nbytes: int
    phase: str
    op: str
    alive: bool = True


@dataclass
class PhasePeak:
    """Largest live total reached while one phase ran, and the storages alive then."""

    phase: str
    peak_bytes: int = 0
    alive_ids: tuple[int, ...] = ()


class LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of storages created by ops while active; ``phase`` labels what runs now.

    ``baseline`` are tensors that existed before (weights, optimizer states): their bytes are added to
    every total so that peaks are comparable with torch.cuda.max_memory_allocated, and views of them
    are not counted again. Storages are told
    apart by their data pointer while alive and forgotten through a weak reference when freed.
    :meth:`mark` names storages after the fact (gradients, say); :meth:`breakdown` sums what was alive
    at a phase's peak by (phase that created it, kind).
    """

    def __init__(self, baseline: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        baseline_storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in baseline}
        self.baseline_bytes = sum(baseline_storages.values())
        self._baseline_pointers = set(baseline_storages)
        self.phase = "start"
        self.live_bytes = 0
        self.peak_bytes = 0
        self.peak_phase = self.phase
        self.peaks: dict[str, PhasePeak] = {}
        self._records: list[_Record] = []  # every storage created, by record id
        self._alive: dict[int, None] = {}  # record ids of live storages, in creation order
        self._live_ids: dict[int, int] = {}  # data pointer -> record id of a live storage
        self._marked: dict[int, str] = {}  # record id -> kind given by mark()
        self._refs: dict[int, weakref.ref] = {}
        self._paused = False

    # ------------------------------------------------------------------ phases
    def set_phase(self, phase: str) -> None:
        self.phase = phase
        self._update_peak()

    def mark(self, tensors: Iterable[torch.Tensor], kind: str) -> int:
        """Name the live storages of ``tensors`` (e.g. gradients); returns their bytes."""
        total = 0
        for tensor in tensors:
            record_id = self._live_ids.get(tensor.untyped_storage().data_ptr())
            if record_id is not None and record_id not in self._marked:
                self._marked[record_id] = kind
                total += self._records[record_id].nbytes
        return total

    def adopt(self, tensors: Iterable[torch.Tensor], phase: str, kind: str) -> int:
        """Count tensors made before the mode was entered (and not in the baseline) until they are freed."""
        total = 0
        for tensor in tensors:
            before = len(self._records)
            saved_phase, self.phase = self.phase, phase
            self._track(tensor, kind)
            self.phase = saved_phase
            if len(self._records) > before:
                self._marked[before] = kind
                total += self._records[before].nbytes
        return total

    def breakdown(self, record_ids: Iterable[int] | None = None) -> dict[tuple[str, str], int]:
        """Bytes of ``record_ids`` (default: alive now) by (phase that created them, kind)."""
        ids = self._alive if record_ids is None else record_ids
        result: dict[tuple[str, str], int] = defaultdict(int)
        for record_id in ids:
            record = self._records[record_id]
            result[(record.phase, self._marked.get(record_id, record.op))] += record.nbytes
        return dict(result)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Storages created inside are not counted (e.g. copies that stand for host memory)."""
        self._paused = True
        try:
            yield
        finally:
            self._paused = False

    # ------------------------------------------------------------------ counting
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self._paused:
            return out
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor) and value.device.type != "meta":
                self._track(value, str(func.overloadpacket.__name__))
        return out

    def _track(self, tensor: torch.Tensor, op: str) -> None:
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        nbytes = storage.nbytes()
        if pointer == 0 or nbytes == 0 or pointer in self._baseline_pointers:
            return
        record_id = self._live_ids.get(pointer)
        if record_id is not None:
            record = self._records[record_id]
            if record.nbytes != nbytes:  # resized in place (out= ops)
                self.live_bytes += nbytes - record.nbytes
                record.nbytes = nbytes
                self._update_peak()
            return
        record_id = len(self._records)
        self._records.append(_Record(nbytes, self.phase, op))
        self._alive[record_id] = None
        self._live_ids[pointer] = record_id
        self._refs[record_id] = weakref.ref(storage, lambda _ref, p=pointer, i=record_id: self._free(p, i))
        self.live_bytes += nbytes
        self._update_peak()

    def _free(self, pointer: int, record_id: int) -> None:
        record = self._records[record_id]
        if not record.alive:
            return
        record.alive = False
        self._alive.pop(record_id, None)
        self._refs.pop(record_id, None)
        if self._live_ids.get(pointer) == record_id:
            del self._live_ids[pointer]
        self.live_bytes -= record.nbytes

    def _update_peak(self) -> None:
        total = self.baseline_bytes + self.live_bytes
        phase_peak = self.peaks.get(self.phase)
        if phase_peak is None:
            phase_peak = self.peaks[self.phase] = PhasePeak(self.phase)
        if total > phase_peak.peak_bytes:
            phase_peak.peak_bytes = total
            phase_peak.alive_ids = tuple(self._alive)
        if total > self.peak_bytes:
            self.peak_bytes = total
            self.peak_phase = self.phase
