"""Reading a run's TensorBoard event files back with tensorboard's own event reader."""

from __future__ import annotations

from pathlib import Path

from phi2tutor.errors import Phi2TutorError


def event_files(run_dir: str | Path) -> list[Path]:
    return sorted(Path(run_dir).glob("events.out.tfevents.*"))


def read_scalars(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of the run as (step, value) pairs in step order, all event files merged."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = event_files(run_dir)
    if not files:
        raise Phi2TutorError(
            f"{run_dir} holds no TensorBoard event files (events.out.tfevents.*). Give a run directory "
            "such as lightning_logs/version_0, written by phi2tutor fit."
        )
    # One accumulator over the directory reads the files in order and honours a resumed run's purge_step:
    # what the interrupted segment logged after its checkpoint is replaced, not doubled.
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {
        tag: sorted((e.step, e.value) for e in accumulator.Scalars(tag))
        for tag in accumulator.Tags()["scalars"]
    }


def read_texts(run_dir: str | Path) -> dict[str, list[tuple[int, str]]]:
    """Every text summary of the run (add_text) as (step, text) pairs."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    texts: dict[str, list[tuple[int, str]]] = {}
    for path in event_files(run_dir):
        accumulator = EventAccumulator(str(path), size_guidance={"tensors": 0})
        accumulator.Reload()
        for tag in accumulator.Tags().get("tensors", []):
            if accumulator.SummaryMetadata(tag).plugin_data.plugin_name != "text":
                continue  # e.g. the custom-scalars layout: a serialized proto, not text
            for event in accumulator.Tensors(tag):
                values = event.tensor_proto.string_val
                if values:
                    texts.setdefault(tag, []).append((event.step, values[0].decode("utf-8")))
    return texts
