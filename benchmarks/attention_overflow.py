"""fp16 attention at Phi-2's magnitudes on a device: transformers' stock eager path and torch's SDPA against
phi2tutor's fp32-score attention, each beside an fp32 reference.

Query and key entries ~ N(0, 60^2) (Phi-2's query·key products reach the hundreds), head dim 80, 32 heads,
a causal mask, fp16 inputs. Which SDPA kernel runs (flash, memory-efficient, math) depends on the device;
a GTX 10xx card has no flash kernel. Last line:
  RESULT device=... eager_finite=0|1 sdpa_finite=0|1 fp32_scores_finite=0|1 eager_max_err=... sdpa_max_err=...
  fp32_scores_max_err=...   (max |output - fp32 reference|; nan where the output is not finite)

    python benchmarks/attention_overflow.py                 # CUDA (what benchmarks/gpu_check.sh runs)
    python benchmarks/attention_overflow.py --device cpu    # the CPU's kernels, for comparison
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from transformers.models.phi.modeling_phi import eager_attention_forward

from phi2tutor.attention import fp32_scores_attention_forward


class _AttentionModule(torch.nn.Module):
    num_key_value_groups = 1


def phi2_like_inputs(device: str, seq: int, heads: int, head_dim: int, scale: float, seed: int):
    generator = torch.Generator().manual_seed(seed)
    shape = (1, heads, seq, head_dim)
    query = torch.randn(shape, generator=generator) * scale
    key = torch.randn(shape, generator=generator) * scale
    value = torch.randn(shape, generator=generator)
    return query.to(device), key.to(device), value.to(device)


def causal_mask(seq: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    return torch.full((seq, seq), torch.finfo(dtype).min, dtype=dtype, device=device).triu(1)[None, None]


def max_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    if not torch.isfinite(output).all():
        return math.nan
    return float((output.float() - reference).abs().max())


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--head_dim", type=int, default=80)
    parser.add_argument(
        "--scale", type=float, default=60.0, help="standard deviation of query and key entries"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(
            "attention_overflow.py: no CUDA device is visible (give --device cpu to run on the CPU)"
        )
    module = _AttentionModule().eval()
    scaling = args.head_dim**-0.5
    q, k, v = phi2_like_inputs(args.device, args.seq, args.heads, args.head_dim, args.scale, args.seed)
    q16, k16, v16 = q.half(), k.half(), v.half()
    # The reference sees the same fp16-rounded inputs: the error is the kernel's, not the rounding's.
    reference = F.scaled_dot_product_attention(
        q16.double(), k16.double(), v16.double(), is_causal=True
    ).float()
    mask16 = causal_mask(args.seq, torch.float16, args.device)
    with torch.no_grad():
        eager, _ = eager_attention_forward(module, q16, k16, v16, mask16, scaling)
        sdpa = F.scaled_dot_product_attention(q16, k16, v16, is_causal=True).transpose(1, 2)
        ours, _ = fp32_scores_attention_forward(module, q16, k16, v16, mask16, scaling)
    reference = reference.transpose(1, 2)  # eager layouts return (batch, seq, heads, head_dim)
    results = {}
    for name, output in (("eager", eager), ("sdpa", sdpa), ("fp32_scores", ours)):
        finite = bool(torch.isfinite(output).all())
        error = max_error(output, reference)
        results[f"{name}_finite"] = int(finite)
        results[f"{name}_max_err"] = error
        print(
            f"{name:<12} fp16 output finite: {'yes' if finite else 'NO '} | max |error| vs fp32 reference: {error:.4g}"
        )
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(
        f"RESULT device={device.replace(' ', '_')} "
        + " ".join(
            f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
            for key, value in results.items()
        )
    )
    return results


if __name__ == "__main__":
    main()
