"""fp16-safe attention: Phi-2-sized query·key products overflow the stock fp16 path, not ours."""

from __future__ import annotations

import torch
from transformers.models.phi.modeling_phi import eager_attention_forward

from phi2tutor.attention import FP32_SCORES_ATTENTION, fp32_scores_attention_forward
from phi2tutor.model import TutorModule
from tests.conftest import TINY_PHI


class FakeAttentionModule(torch.nn.Module):
    num_key_value_groups = 1


def phi2_like_qkv(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Phi-2's query/key entries reach magnitudes of ~60 (products in the hundreds); head dim 80.
    generator = torch.Generator().manual_seed(0)
    shape = (1, 2, 16, 80)
    query = torch.randn(shape, generator=generator) * 60
    key = torch.randn(shape, generator=generator) * 60
    value = torch.randn(shape, generator=generator)
    return query.to(dtype), key.to(dtype), value.to(dtype)


def causal_mask(length: int, dtype: torch.dtype) -> torch.Tensor:
    mask = torch.full((length, length), torch.finfo(dtype).min, dtype=dtype).triu(1)
    return mask[None, None]


def test_stock_eager_fp16_overflows_and_fp32_scores_stay_finite_and_match_reference() -> None:
    module = FakeAttentionModule().eval()
    query, key, value = phi2_like_qkv(torch.float16)
    scaling = 80**-0.5
    stock, _ = eager_attention_forward(module, query, key, value, causal_mask(16, torch.float16), scaling)
    assert not torch.isfinite(stock).all()  # inf scores -> NaN after softmax

    ours, _ = fp32_scores_attention_forward(
        module, query, key, value, causal_mask(16, torch.float16), scaling
    )
    assert ours.dtype == torch.float16
    assert torch.isfinite(ours).all()
    reference, _ = eager_attention_forward(
        module, query.float(), key.float(), value.float(), causal_mask(16, torch.float32), scaling
    )
    torch.testing.assert_close(ours.float(), reference, rtol=2e-2, atol=2e-2)


def test_fp32_scores_survive_autocast() -> None:
    module = FakeAttentionModule().eval()
    query, key, value = phi2_like_qkv(torch.float32)
    with torch.autocast("cpu", dtype=torch.float16):
        ours, weights = fp32_scores_attention_forward(module, query, key, value, None, 80**-0.5)
    assert torch.isfinite(ours).all()
    assert torch.isfinite(weights).all()


def test_float16_module_uses_fp32_scores_and_a_float16_phi_stays_finite() -> None:
    def logits(attn: str | None) -> torch.Tensor:
        module = TutorModule(
            model_config=dict(TINY_PHI), compute_dtype="float16", attn_implementation=attn, lora_dropout=0.0
        )
        module.configure_model()
        base = module.model.get_base_model()
        with torch.no_grad():
            for layer in base.model.layers:  # blow query/key up to Phi-2's magnitudes
                layer.self_attn.q_proj.weight.mul_(400)
                layer.self_attn.k_proj.weight.mul_(400)
        ids = torch.arange(1, 33)[None]
        with torch.no_grad():
            return module.eval()(ids, torch.ones_like(ids)).logits, module.attention_implementation

    safe, implementation = logits(None)
    assert implementation == FP32_SCORES_ATTENTION
    assert torch.isfinite(safe).all()
    stock, _ = logits("eager")
    assert not torch.isfinite(stock).all()
