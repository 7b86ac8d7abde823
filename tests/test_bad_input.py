"""Bad input through the real CLI: one paragraph on stderr, exit 2, no traceback, nothing left behind;
Lightning's conventions (default_root_dir, logger false); score --output; doctor with injected facts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from phi2tutor.cli import main
from phi2tutor.doctor import ConfigFacts, GpuFacts, MachineFacts, diagnose, render
from tests.conftest import REPO, tiny_config, write_yaml


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    """main() in-process: the exit code and the error line (stderr's other lines are Lightning's logging,
    whose handlers in-process may hold an earlier test's closed stream; the subprocess test checks stderr
    whole)."""
    try:
        main(args)
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("phi2tutor: error: ")]
    return code, "\n".join(errors)


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ({"args": ["--data.batch_size", "-1"]}, "data.batch_size=-1 is invalid"),
        (
            {"args": ["--data.batch_size", "autox"]},
            "data.batch_size='autox' is invalid: it must be a positive integer, or auto",
        ),
        (
            {"args": ["--data.batch_size", "0"]},
            "data.batch_size=0 is invalid: it must be a positive integer, or auto",
        ),
        (
            # Found when the Trainer is there (devices x nodes): after the data audit, which is removed too.
            {"args": ["--data.batch_size", "3", "--data.effective_batch_size", "8"]},
            "The effective batch 8 (data.effective_batch_size) is not a multiple of micro-batch 3 x 1 device(s)",
        ),
        ({"args": ["--model.lora_r", "0"]}, "model.lora_r=0 is invalid"),
        (
            {"callbacks": [{"class_path": "callbacks.phases.PhaseDetection", "init_args": {"window": 0}}]},
            "PhaseDetection: window=0",
        ),
        (
            {
                "callbacks": [
                    {"class_path": "callbacks.memory.GPUMemoryProfiler", "init_args": {"every_n_steps": 0}}
                ]
            },
            "GPUMemoryProfiler.every_n_steps=0 is invalid",
        ),
        (
            {
                "callbacks": [
                    {"class_path": "callbacks.report.TrainingReport", "init_args": {"language": "fr"}}
                ]
            },
            "language='fr' is not available",
        ),
        ({"train_file": b'{"question": "Caf\xe9?", "answer": "#### 1"}\n'}, "line 1: byte 0xe9 is not UTF-8"),
        ({"train_file": b'{"question": "q", "answer": "#### seven"}\n'}, '"#### seven" is not a number'),
        (
            {"train_file": b'\n\n{"question": 5, "answer": "#### 5"}\n'},
            "line 3 has a 'question' that is not text",
        ),
        (
            {"train_file": b"question,answer\nq,#### 1\n", "suffix": ".parquet"},
            "is not a readable Parquet file",
        ),
        (
            {"args": ["--model.model_config", "null", "--model.model_name_or_path", "./no/such"]},
            "no directory exists",
        ),
        (
            {"args": ["--trainer.max_epochs", "-3"]},
            "Lightning rejects the trainer configuration: `max_epochs` must be a non-negative integer",
        ),
        pytest.param(
            {"args": ["--trainer.accelerator", "gpu"]},
            "no usable GPU to this torch build: run `phi2tutor doctor`",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU"),
        ),
        (
            {"args": ["--model.model_name_or_path", "./my-model"]},
            "model.model_name_or_path='./my-model' would not be loaded: give one of the two",
        ),
        (
            {"args": ["--trainer.logger.init_args.save_dir", "/sys/phi2tutor-test"]},
            "Cannot write /sys/phi2tutor-test",
        ),
    ],
)
def test_bad_input_is_one_paragraph_exit_2_nothing_left(
    tmp_path: Path, capsys, override: dict, words: str
) -> None:
    config = tiny_config(tmp_path / "run")
    if "callbacks" in override:
        config["trainer"]["callbacks"] = [
            *override["callbacks"],
            {"class_path": "callbacks.report.TrainingReport"},
        ]
    if "train_file" in override:
        path = tmp_path / f"train{override.get('suffix', '.jsonl')}"
        path.write_bytes(override["train_file"])
        config["data"] = {"source": "files", "train_path": str(path), "val_path": str(path)}
        config["trainer"]["callbacks"] = [{"class_path": "callbacks.report.TrainingReport"}]
    code, err = run_cli(
        ["fit", "--config", str(write_yaml(tmp_path / "c.yaml", config)), *override.get("args", [])], capsys
    )
    assert code == 2
    assert "phi2tutor: error: " in err and words in err
    assert "TrainingReport" not in err.replace("TrainingReport: language", "")  # no report warning first
    assert files_under(tmp_path / "run") == []  # no version_N/ for a run that never started


def test_damaged_checkpoints_and_adapter(tmp_path: Path, capsys) -> None:
    (tmp_path / "empty.ckpt").write_bytes(b"")
    torch.save({"a": 1}, tmp_path / "foreign.ckpt")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{not json")
    config = write_yaml(tmp_path / "c.yaml", tiny_config(tmp_path / "run"))
    for command, args, words in (
        ("validate", ["--ckpt_path", str(tmp_path / "empty.ckpt")], "is empty (0 bytes)"),
        ("validate", ["--ckpt_path", str(tmp_path / "foreign.ckpt")], "not a Lightning checkpoint"),
        ("validate", ["--model.adapter_path", str(tmp_path / "adapter")], "could not be read"),
        # fit reads the checkpoint first to resume (phi2tutor.resume): the same messages
        ("fit", ["--ckpt_path", str(tmp_path / "empty.ckpt")], "is empty (0 bytes)"),
        ("fit", ["--ckpt_path", str(tmp_path / "foreign.ckpt")], "not a Lightning checkpoint"),
        (
            "validate",
            ["--ckpt_path", str(tmp_path / "missing.ckpt")],
            "missing.ckpt: no such checkpoint file",
        ),
        ("test", ["--ckpt_path", "last"], "--ckpt_path last: no last.ckpt in"),
    ):
        code, err = run_cli([command, "--config", str(config), *args], capsys)
        assert code == 2 and words in err, err
    assert files_under(tmp_path / "run") == []


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (
            ["--model.lora_r", "0"],
            "phi2tutor: error: model.lora_r=0 is invalid: it must be a positive integer (the LoRA rank, e.g. 8 "
            "or 16). Fix the option.",
        ),
        (
            # A value of the wrong type: one paragraph, not jsonargparse's usage dump.
            ["--data.batch_size", "autox"],
            "phi2tutor: error: data.batch_size='autox' is invalid: it must be a positive integer, or auto (the "
            "largest micro-batch the memory planner fits in the budget). Fix the option.",
        ),
        (
            # jsonargparse wraps a callback's constructor error in a Union ValueError with a Namespace dump.
            [
                "--trainer.callbacks+=callbacks.memory.GPUMemoryProfiler",
                "--trainer.callbacks.every_n_steps=0",
            ],
            "phi2tutor: error: GPUMemoryProfiler.every_n_steps=0 is invalid: it must be a positive number of "
            "optimizer steps. Fix the option.",
        ),
    ],
)
def test_no_traceback_reaches_stderr_of_the_real_command(
    tmp_path: Path, option: list[str], message: str
) -> None:
    config = write_yaml(tmp_path / "c.yaml", tiny_config(tmp_path / "run"))
    result = subprocess.run(
        [sys.executable, "-m", "phi2tutor.cli", "fit", "--config", str(config), *option],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == message
    assert "Namespace(" not in result.stderr


def test_default_root_dir_and_logger_false_through_the_cli(
    tmp_path: Path, capsys, monkeypatch, lightning_messages
) -> None:
    monkeypatch.chdir(tmp_path)
    config = tiny_config(tmp_path, trainer={"max_epochs": 1})
    del config["trainer"]["logger"], config["trainer"]["default_root_dir"]
    config["trainer"]["callbacks"] = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": True}}
    ]
    path = write_yaml(tmp_path / "c.yaml", config)
    assert run_cli(["fit", "--config", str(path), "--trainer.default_root_dir", "out"], capsys)[0] == 0
    run_dir = tmp_path / "out" / "lightning_logs" / "version_0"
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file() and (
        run_dir / "config.yaml"
    ).is_file()
    assert not (tmp_path / "lightning_logs").exists()
    # `last` is looked for where the run wrote it: under default_root_dir.
    code, _ = run_cli(
        ["validate", "--config", str(path), "--trainer.default_root_dir", "out", "--ckpt_path", "last"],
        capsys,
    )
    assert code == 0
    assert "weights from the checkpoint at out/lightning_logs/version_0/checkpoints/last.ckpt" in (
        lightning_messages.text
    )
    assert run_cli(["fit", "--config", str(path), "--trainer.logger", "false"], capsys)[0] == 0
    assert not (tmp_path / "config.yaml").exists()  # no run directory: nothing dropped into the cwd


def test_score_output_rows_and_empty_file(tmp_path: Path, capsys) -> None:
    predictions = tmp_path / "p.jsonl"
    predictions.write_text(
        '\ufeff{"prediction": "#### 3", "answer": "#### 3"}\n\n{"prediction": "no", "answer": "4"}\n'
    )
    code, _ = run_cli(["score", str(predictions), "--output", str(tmp_path / "rows.jsonl")], capsys)
    assert code == 0
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert rows == [
        {"line": 1, "extracted": "3", "reference": "3", "correct": True, "invalid": False},
        {"line": 3, "extracted": None, "reference": "4", "correct": False, "invalid": True},
    ]
    (tmp_path / "empty.jsonl").write_text("")
    code, err = run_cli(["score", str(tmp_path / "empty.jsonl")], capsys)
    assert code == 2 and "holds no rows" in err


def test_grading_does_not_import_torch() -> None:
    code = "import sys, phi2tutor.cli, phi2tutor.grading; print('torch' in sys.modules)"
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO).stdout.strip()
        == "False"
    )


GTX_1050_TI = GpuFacts(name="NVIDIA GeForce GTX 1050 Ti", capability=(6, 1), total_mb=4096, free_mb=3900)


def test_doctor_on_a_gtx_1050_ti_with_a_cuda_12_8_torch() -> None:
    facts = MachineFacts(
        torch_version="2.8.0+cu128",
        torch_cuda="12.8",
        arch_list=["sm_75", "sm_80", "sm_90"],
        gpus=[GTX_1050_TI],
        bnb_version="0.48.0",
        bnb_4bit_error="CUDA error: no kernel image is available",
    )
    config = ConfigFacts("c.yaml", 2907.0, None, uses_bf16=True, quantized=True, eight_bit_optimizer=True)
    text = render(diagnose(facts, config))
    assert "no kernels for the NVIDIA GeForce GTX 1050 Ti (sm_61)" in text
    assert (
        "fix: pip install --force-reinstall torch==2.8.0 --index-url https://download.pytorch.org/whl/cu126"
        in text
    )
    assert (
        "c.yaml asks for bf16" in text and "compute_dtype: float16 with trainer.precision: 16-mixed" in text
    )
    assert "could not run a 4-bit (NF4) matmul" in text and "ran an 8-bit AdamW step" in text
    assert "2,907 MB on the card; 3,900 MB are free now: it fits" in text


def test_doctor_on_an_ampere_card_that_is_short_of_memory_and_on_the_cpu() -> None:
    gpu = GpuFacts(name="NVIDIA RTX 3090", capability=(8, 6), total_mb=24576, free_mb=1000)
    facts = MachineFacts(
        torch_version="2.8.0", torch_cuda="12.8", arch_list=["sm_86"], gpus=[gpu], bnb_version="0.48"
    )
    findings = diagnose(facts, ConfigFacts("c.yaml", 2907.0, None, False, True, True))
    assert [f.level for f in findings].count("problem") == 1
    assert "does not fit" in render(findings) and "bf16 is supported" in render(findings)
    cpu = diagnose(MachineFacts(torch_version="2.13.0+cpu", torch_cuda=None, bnb_version="0.50"))
    assert cpu[0].level == "note" and "No CUDA device" in cpu[0].message and "the demo" in cpu[0].message
    assert cpu[0].fix == (
        "on a machine with an NVIDIA GPU: pip install --force-reinstall torch==2.13.0 --index-url "
        "https://download.pytorch.org/whl/cu128 (GTX 10xx: pip install --force-reinstall torch==2.13.0 "
        "--index-url https://download.pytorch.org/whl/cu126)"
    )


def test_doctor_reads_the_config_as_fit_and_plan_do() -> None:
    from phi2tutor.doctor import config_facts
    from phi2tutor.memory.plan_command import plan_fit_config

    config = str(REPO / "configs" / "phi2-qlora-4gb.yaml")
    facts = config_facts(config)
    estimate, _ = plan_fit_config(["--config", config])
    assert facts.estimated_peak_mb == estimate.estimated_peak_mb and facts.estimate_error is None
    assert facts.quantized and facts.eight_bit_optimizer and not facts.uses_bf16
