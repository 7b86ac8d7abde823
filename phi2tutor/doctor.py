"""``phi2tutor doctor``: check this machine against a config before a day is spent on a run that cannot work.

Two halves: :func:`gather_facts` probes the machine (GPU, torch build, bitsandbytes on the device, bf16)
into a plain :class:`MachineFacts`; :func:`diagnose` turns facts (and, with ``--config``, the planner's
estimate) into findings with the exact command that fixes each problem. diagnose is pure, so every message
is tested on the CPU with the facts of a GTX 1050 Ti, an RTX 3090 or a CPU-only machine injected.
"""

from __future__ import annotations

import argparse
import platform
from dataclasses import dataclass, field

# The last PyTorch CUDA builds with Pascal (sm_60/sm_61) kernels: the CUDA 12.8+ wheels dropped them.
PASCAL_TORCH_INDEX = "https://download.pytorch.org/whl/cu126"
CUDA_TORCH_INDEX = "https://download.pytorch.org/whl/cu128"
BNB_INSTALL = "pip install --force-reinstall bitsandbytes"


def torch_install(torch_version: str, pascal: bool) -> str:
    """The command that replaces this torch with the CUDA build of the same release (so the fix stays in
    the project's torch range and changes nothing else): ``2.13.0+cpu`` -> ``torch==2.13.0``."""
    release = torch_version.split("+", 1)[0]
    index = PASCAL_TORCH_INDEX if pascal else CUDA_TORCH_INDEX
    return f"pip install --force-reinstall torch=={release} --index-url {index}"


# NF4 and the 8-bit optimizers need compute capability 6.0 (DESIGN.md); native bf16 arrives with Ampere.
MIN_BNB_CAPABILITY = (6, 0)
MIN_BF16_CAPABILITY = (8, 0)
MIN_TRITON_CAPABILITY = (7, 0)


@dataclass
class GpuFacts:
    """One CUDA device as torch sees it."""

    name: str
    capability: tuple[int, int]
    total_mb: float
    free_mb: float

    @property
    def sm(self) -> str:
        return f"sm_{self.capability[0]}{self.capability[1]}"


@dataclass
class MachineFacts:
    """What the checks found; None where a check could not run (no device, no library)."""

    torch_version: str
    torch_cuda: str | None
    """CUDA version the torch build was made for; None for a CPU-only build."""
    arch_list: list[str] = field(default_factory=list)
    """torch.cuda.get_arch_list(): the GPU architectures this build has kernels for."""
    gpus: list[GpuFacts] = field(default_factory=list)
    bnb_version: str | None = None
    bnb_error: str | None = None
    """Why bitsandbytes could not be imported or its CUDA library not loaded."""
    bnb_4bit_error: str | None = None
    """None when a 4-bit (NF4) matmul ran on the device; the error otherwise."""
    bnb_8bit_optimizer_error: str | None = None
    """None when an 8-bit AdamW step ran on the device; the error otherwise."""
    kernel_error: str | None = None
    """A plain torch matmul on the device failed (no kernel image for the card, a driver problem)."""


@dataclass
class Finding:
    """One line of the doctor's answer."""

    level: str
    """"ok", "note" or "problem"."""
    message: str
    fix: str | None = None
    """The exact command or config change that fixes a problem."""


@dataclass
class ConfigFacts:
    """What the doctor needs from a config: the planner's estimate and the dtype choices."""

    source: str
    estimated_peak_mb: float | None
    estimate_error: str | None
    uses_bf16: bool
    quantized: bool
    eight_bit_optimizer: bool


# ---------------------------------------------------------------------------------------------- gathering
def gather_facts() -> MachineFacts:
    """Probe this machine. On a GPU it runs a small matmul, an NF4 matmul and an 8-bit optimizer step."""
    import torch

    facts = MachineFacts(torch_version=torch.__version__, torch_cuda=torch.version.cuda)
    if not torch.cuda.is_available():
        _bnb_import(facts)
        return facts
    facts.arch_list = list(torch.cuda.get_arch_list())
    for index in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(index)
        facts.gpus.append(
            GpuFacts(
                name=torch.cuda.get_device_name(index),
                capability=tuple(torch.cuda.get_device_capability(index)),
                total_mb=total / 2**20,
                free_mb=free / 2**20,
            )
        )
    try:
        x = torch.ones(8, 8, device="cuda:0")
        (x @ x).sum().item()
    except Exception as error:  # "no kernel image is available for execution on the device"
        facts.kernel_error = _first_line(error)
        return facts
    bnb = _bnb_import(facts)
    if bnb is None:
        return facts
    try:
        layer = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float16, quant_type="nf4").to("cuda:0")
        layer(torch.randn(2, 64, device="cuda:0", dtype=torch.float16)).sum().item()
    except Exception as error:
        facts.bnb_4bit_error = _first_line(error)
    try:
        # 8-bit states only for tensors of 4096+ elements (smaller ones stay 32-bit): use 8192.
        weight = torch.nn.Parameter(torch.randn(8192, device="cuda:0"))
        optimizer = bnb.optim.AdamW8bit([weight], lr=1e-3)
        weight.grad = torch.randn_like(weight)
        optimizer.step()
        torch.cuda.synchronize()
    except Exception as error:
        facts.bnb_8bit_optimizer_error = _first_line(error)
    return facts


def _bnb_import(facts: MachineFacts):
    try:
        import bitsandbytes as bnb
    except Exception as error:  # ImportError, or its CUDA library failing to load
        facts.bnb_error = _first_line(error)
        return None
    facts.bnb_version = getattr(bnb, "__version__", "?")
    return bnb


def _first_line(error: BaseException) -> str:
    from phi2tutor.errors import first_line

    return first_line(error, 300)


def config_facts(config_path: str) -> ConfigFacts:
    """The config's dtype choices and the planner's peak estimate, read by fit's own parser (the one
    `phi2tutor plan` uses), so the doctor judges the run that fit would start."""
    estimated, error_text, settings = None, None, {}
    try:
        from phi2tutor.memory.plan_command import plan_fit_config

        estimate, _ = plan_fit_config(["--config", config_path])
        estimated, settings = estimate.estimated_peak_mb, estimate.settings
    except (Exception, SystemExit) as error:  # a config error is one finding among the others
        error_text = (
            _first_line(error)
            if isinstance(error, Exception)
            else f"{config_path} does not parse as a fit config (see above)"
        )
    return ConfigFacts(
        source=config_path,
        estimated_peak_mb=estimated,
        estimate_error=error_text,
        uses_bf16=settings.get("compute_dtype") == "bfloat16"
        or str(settings.get("precision", "")).startswith("bf16"),
        quantized=settings.get("quantization", "none") != "none",
        eight_bit_optimizer=str(settings.get("optimizer", "adamw")).endswith("8bit"),
    )


# ---------------------------------------------------------------------------------------------- diagnosis
def diagnose(facts: MachineFacts, config: ConfigFacts | None = None) -> list[Finding]:
    """What will and will not work on this machine, each problem with its fix."""
    findings: list[Finding] = []
    build = f"torch {facts.torch_version} ({'CUDA ' + facts.torch_cuda if facts.torch_cuda else 'CPU-only build'})"
    if not facts.gpus:
        if facts.torch_cuda is None:
            findings.append(
                Finding(
                    "problem" if config else "note",
                    f"No CUDA device: {build}. Runs here: the tests, the demo (configs/demo.yaml), plan, score "
                    "and report. Training Phi-2 needs an NVIDIA GPU and a CUDA build of torch.",
                    f"on a machine with an NVIDIA GPU: {torch_install(facts.torch_version, pascal=False)} "
                    f"(GTX 10xx: {torch_install(facts.torch_version, pascal=True)})",
                )
            )
        else:
            findings.append(
                Finding(
                    "problem" if config else "note",
                    f"No CUDA device visible to {build}: no NVIDIA driver, no GPU, or CUDA_VISIBLE_DEVICES hides "
                    "it. Runs here: the tests, the demo (configs/demo.yaml), plan, score and report.",
                    "check `nvidia-smi`; install the NVIDIA driver if it is missing",
                )
            )
        findings += _bnb_findings(facts, None, config)
        if config is not None:
            findings.append(_memory_finding(None, config))
        return findings

    gpu = facts.gpus[0]
    findings.append(
        Finding(
            "ok",
            f"GPU 0: {gpu.name}, compute capability {gpu.capability[0]}.{gpu.capability[1]} ({gpu.sm}), "
            f"{gpu.free_mb:,.0f} MB free of {gpu.total_mb:,.0f} MB; {build}"
            + (f"; {len(facts.gpus) - 1} more GPU(s)" if len(facts.gpus) > 1 else ""),
        )
    )
    pascal = gpu.capability[0] == 6
    install = torch_install(facts.torch_version, pascal)
    if facts.arch_list and gpu.sm not in facts.arch_list:
        why = (
            " (PyTorch's CUDA 12.8+ builds dropped Pascal; the CUDA 12.6 builds still have it)"
            if pascal
            else ""
        )
        findings.append(
            Finding(
                "problem",
                f"This torch build has no kernels for the {gpu.name} ({gpu.sm}); it has {', '.join(facts.arch_list)}"
                f"{why}. Nothing would run on the GPU.",
                install,
            )
        )
    elif facts.kernel_error:
        findings.append(Finding("problem", f"A matmul on the GPU failed: {facts.kernel_error}", install))
    else:
        findings.append(Finding("ok", f"torch has kernels for {gpu.sm} and a matmul ran on the GPU."))

    if gpu.capability >= MIN_BF16_CAPABILITY:
        findings.append(
            Finding("ok", "bf16 is supported: compute_dtype bfloat16 with precision bf16-mixed works.")
        )
    else:
        advice = (
            "use model.compute_dtype: float16 with trainer.precision: 16-mixed; phi2tutor then computes "
            "attention scores in fp32 (Phi-2 overflows in fp16 otherwise), as configs/phi2-qlora-4gb.yaml does"
        )
        level = "problem" if config is not None and config.uses_bf16 else "note"
        where = f"{config.source} asks for bf16" if level == "problem" else "no bf16 on this card"
        findings.append(Finding(level, f"{where} ({gpu.name} has compute capability below 8.0).", advice))
    if gpu.capability < MIN_TRITON_CAPABILITY:
        findings.append(
            Finding(
                "note",
                "Triton needs compute capability 7.0+: torch.compile's GPU backend, Liger-Kernel and Unsloth do "
                "not run here; phi2tutor's own memory savings (NF4, checkpointing, answer-only logits) do.",
            )
        )
    findings += _bnb_findings(facts, gpu, config)
    if config is not None:
        findings.append(_memory_finding(gpu, config))
    return findings


def _bnb_findings(facts: MachineFacts, gpu: GpuFacts | None, config: ConfigFacts | None) -> list[Finding]:
    needed = config is None or config.quantized or config.eight_bit_optimizer
    level = "problem" if needed else "note"
    if facts.bnb_error:
        return [Finding(level, f"bitsandbytes does not load: {facts.bnb_error}", BNB_INSTALL)]
    if gpu is None:
        return [
            Finding(
                "note", f"bitsandbytes {facts.bnb_version} imports; its 4-bit and 8-bit paths run on the CPU."
            )
        ]
    if gpu.capability < MIN_BNB_CAPABILITY:
        return [
            Finding(
                level,
                f"{gpu.name} (compute capability {gpu.capability[0]}.{gpu.capability[1]}) is below 6.0: bitsandbytes' "
                "NF4 and 8-bit optimizers need 6.0+.",
                "set model.quantization: none and model.optimizer: adamw (and expect Phi-2 not to fit 4 GB)",
            )
        ]
    findings = []
    for what, error in (
        ("a 4-bit (NF4) matmul", facts.bnb_4bit_error),
        ("an 8-bit AdamW step", facts.bnb_8bit_optimizer_error),
    ):
        if error:
            hint = " (bitsandbytes' CUDA 12.8+ binaries start at sm_70; its 11.8-12.6 builds cover Pascal)"
            findings.append(
                Finding(
                    level,
                    f"bitsandbytes {facts.bnb_version} could not run {what} on the GPU: {error}"
                    + (hint if gpu.capability[0] == 6 else ""),
                    BNB_INSTALL
                    + (f"; and torch from {PASCAL_TORCH_INDEX}" if gpu.capability[0] == 6 else ""),
                )
            )
        else:
            findings.append(Finding("ok", f"bitsandbytes {facts.bnb_version} ran {what} on the GPU."))
    return findings


def _memory_finding(gpu: GpuFacts | None, config: ConfigFacts) -> Finding:
    if config.estimated_peak_mb is None:
        return Finding("problem", f"No memory estimate for {config.source}: {config.estimate_error}", None)
    peak = config.estimated_peak_mb
    if gpu is None:
        return Finding(
            "note", f"{config.source}: the planner estimates a peak of {peak:,.0f} MB on a CUDA card."
        )
    free = gpu.free_mb
    text = f"{config.source}: the planner estimates a peak of {peak:,.0f} MB on the card; {free:,.0f} MB are free now"
    if peak <= free:
        return Finding("ok", f"{text}: it fits ({100 * peak / free:.0f}% of the free memory).")
    return Finding(
        "problem",
        f"{text}: it does not fit. Close other programs using the GPU (`nvidia-smi` lists them), or lower the peak.",
        "lower data.batch_size and raise trainer.accumulate_grad_batches, lower data.max_length, or set "
        "model.gradient_checkpointing: true; `phi2tutor plan --config ...` shows the breakdown",
    )


def render(findings: list[Finding]) -> str:
    labels = {"ok": "ok     ", "note": "note   ", "problem": "PROBLEM"}
    lines = []
    for finding in findings:
        lines.append(f"{labels[finding.level]}  {finding.message}")
        if finding.fix:
            lines.append(f"         fix: {finding.fix}")
    problems = sum(finding.level == "problem" for finding in findings)
    lines.append(f"{problems} problem(s) found." if problems else "No problems found.")
    return "\n".join(lines)


def main_doctor(argv: list[str]) -> None:
    """``phi2tutor doctor [--config C.yaml]``: print the findings; exit 1 when there is a problem."""
    parser = argparse.ArgumentParser(
        prog="phi2tutor doctor",
        description="Check this machine (GPU, torch build, bitsandbytes on the device, bf16, free memory) and, "
        "with --config, the planner's memory estimate of that config against the free GPU memory. Each "
        "problem comes with the command that fixes it. Exit status 1 when a problem is found.",
    )
    parser.add_argument("--config", help="a `phi2tutor fit` YAML file to check against this machine")
    args = parser.parse_args(argv)
    config = config_facts(args.config) if args.config else None
    findings = diagnose(gather_facts(), config)
    print(f"phi2tutor doctor on {platform.node() or 'this machine'} (Python {platform.python_version()})")
    print(render(findings))
    if any(finding.level == "problem" for finding in findings):
        raise SystemExit(1)
