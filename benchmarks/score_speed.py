"""`phi2tutor score` start-up and grading time on 1,000 rows, beside the same command with torch and
torchmetrics imported first (what grading.py cost before the metric moved to phi2tutor/metrics.py).

    python benchmarks/score_speed.py [--rows 1000] [--repeats 5]

Prints the median wall time of each side, their ratio and a RESULT line (target: under 1 s).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "predictions.jsonl"
        with path.open("w") as handle:
            for i in range(args.rows):
                row = {"prediction": f"{i} + 1 = {i + 1}\n#### {i + 1}", "answer": f"#### {i + (i % 3 > 0)}"}
                handle.write(json.dumps(row) + "\n")
        score = [
            sys.executable,
            "-m",
            "phi2tutor.cli",
            "score",
            str(path),
            "--output",
            str(Path(directory) / "r.jsonl"),
        ]
        with_torch = [
            sys.executable,
            "-c",
            "import sys, torch, torchmetrics; from phi2tutor.cli import main; main(sys.argv[1:])",
            *score[3:],
        ]
        help_command = [sys.executable, "-m", "phi2tutor.cli", "score", "--help"]
        sides = {"score": [], "score after importing torch": [], "score --help": []}
        for _ in range(args.repeats):  # alternate the sides so machine load hits both alike
            sides["score"].append(timed(score))
            sides["score after importing torch"].append(timed(with_torch))
            sides["score --help"].append(timed(help_command))
    medians = {name: statistics.median(times) for name, times in sides.items()}
    for name, seconds in medians.items():
        print(f"{name:<30} {seconds:.3f} s (median of {args.repeats})")
    ratio = medians["score after importing torch"] / medians["score"]
    print(
        f"RESULT score of {args.rows} rows {medians['score']:.3f} s, --help {medians['score --help']:.3f} s, "
        f"{ratio:.1f}x faster than with torch imported; under 1 s: {max(medians['score'], medians['score --help']) < 1}"
    )


if __name__ == "__main__":
    main()
