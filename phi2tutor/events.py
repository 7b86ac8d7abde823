"""Reading a run's TensorBoard event files back with tensorboard's own event reader."""

from __future__ import annotations

import struct
from pathlib import Path

from phi2tutor.errors import Phi2TutorError

_HEADER = struct.Struct("<QI")  # TFRecord framing: payload length, masked CRC-32C of the length


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
    for path in files:
        check_event_file(path)
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


def check_event_file(path: str | Path) -> int:
    """Walk an event file's TFRecord framing and return its number of complete records.

    tensorboard's reader stops silently at the first bad record, so a damaged file would read as a run
    that logged nothing (and a report would say it "ended before its first epoch"). A cut-off last record
    (a run killed while writing) is accepted, as tensorboard accepts it; a record whose header checksum
    fails, or a file with no readable record, is an error. Only the 12-byte headers are checked: cheap.

    Raises:
        Phi2TutorError: the file is damaged; the message names it and the byte offset.
    """
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    path = Path(path)
    data = path.read_bytes()
    offset = records = 0
    while offset + _HEADER.size <= len(data):
        length, length_crc = _HEADER.unpack_from(data, offset)
        if masked_crc32c(data[offset : offset + 8]) != length_crc:
            break
        end = offset + _HEADER.size + length + 4
        if end > len(data):
            return records  # a cut-off last record: the earlier ones are sound
        offset, records = end, records + 1
    if offset == len(data) or (records and len(data) - offset < _HEADER.size):
        return records
    raise Phi2TutorError(
        f"The TensorBoard event file {path} is damaged at byte {offset:,} of {len(data):,} (after {records} "
        "readable records), so the run's logged values cannot be read. Copy the run directory again from "
        "where it was written, or remove the damaged file if another event file of the run holds the values."
    )
