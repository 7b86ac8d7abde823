"""Peak GPU memory of a fine-tuning configuration, estimated from the model's shape before any weight
is loaded: weights by quantization, LoRA weights, gradients and optimizer states, activations,
logits, allocator overhead and CUDA context. Pure functions; ``phi2tutor plan`` prints them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from phi2tutor.errors import Phi2TutorError, first_line
from phi2tutor.phi2 import PHI2_HUB_ID, PHI2_LORA_TARGETS

MB = 2**20  # "MB" as torch.cuda's memory statistics and the reference run report it: MiB.

DEFAULT_BUDGET_MB = 4096.0
QUANTIZATIONS = ("none", "nf4", "nf4-double", "int8")
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit")
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
PRECISIONS = {
    # Lightning precision -> (autocast to a 16-bit dtype, bytes of trainable weights)
    "16-mixed": (True, 4),
    "bf16-mixed": (True, 4),
    "16": (True, 4),
    "bf16": (True, 4),
    "32-true": (False, 4),
    "32": (False, 4),
    "16-true": (False, 2),
    "bf16-true": (False, 2),
}
FP32_SCORES_ATTENTION = "phi2tutor_fp32_scores"  # phi2tutor.attention registers it under this name
ATTENTIONS = ("eager", "sdpa", FP32_SCORES_ATTENTION)

# Layout constants of bitsandbytes (0.45 - 0.50), read from bitsandbytes/functional.py and
# bitsandbytes/optim/optimizer.py; tests check them against real tensors.
NF4_BLOCKSIZE = 64  # quantize_4bit: one absmax per 64 weights
NF4_CODE_ENTRIES = 16  # QuantState.code: the 16 NF4 values, fp32, one copy per layer
NESTED_BLOCKSIZE = 256  # double quantization: the absmax values are quantized in blocks of 256
DYNAMIC_CODE_ENTRIES = 256  # 8-bit dynamic map (state2.code per layer, qmap1/qmap2 of 8-bit optimizers)
OPTIMIZER_8BIT_BLOCKSIZE = 256
OPTIMIZER_8BIT_MIN_SIZE = 4096  # smaller parameters keep 32-bit state (min_8bit_size)
PAGED_MIN_NUMEL = 100_000  # paged optimizers page state buffers of at least this many elements

# Not seen by torch.cuda.max_memory_allocated, but the card must hold it. Measured contexts of
# CUDA 12 with cuBLAS loaded lie between ~300 and ~400 MB on Pascal cards.
DEFAULT_CUDA_CONTEXT_MB = 350.0
# reserved / max allocated - 1 of the reference run (3228 / 3087.42 MB = +4.6%), rounded up.
DEFAULT_ALLOCATOR_OVERHEAD_FRACTION = 0.05

# Shapes of models whose config.json is known, so `plan` works without the hub.
KNOWN_MODEL_CONFIGS: dict[str, dict[str, Any]] = {
    PHI2_HUB_ID: {
        "hidden_size": 2560,
        "intermediate_size": 10240,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 51200,
        "partial_rotary_factor": 0.4,
        "max_position_embeddings": 2048,
        "hidden_act": "gelu_new",
        "resid_pdrop": 0.1,
        "embd_pdrop": 0.0,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
    },
    "microsoft/phi-1_5": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 24,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 51200,
        "partial_rotary_factor": 0.5,
        "max_position_embeddings": 2048,
        "hidden_act": "gelu_new",
        "tie_word_embeddings": False,
    },
}

Terms = list[tuple[str, int]]


# --------------------------------------------------------------------------- model shape
@dataclass(frozen=True)
class ModelShape:
    """The numbers of a PhiForCausalLM that decide its memory."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    vocab_size: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    partial_rotary_factor: float = 0.5
    max_position_embeddings: int = 2048
    hidden_act: str = "gelu_new"
    resid_pdrop: float = 0.0
    tie_word_embeddings: bool = False
    qk_layernorm: bool = False

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_size * self.partial_rotary_factor)

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(out_features, in_features) of each linear layer of one decoder layer, by module name."""
        h, i, d = self.hidden_size, self.intermediate_size, self.head_size
        return {
            "q_proj": (self.num_attention_heads * d, h),
            "k_proj": (self.kv_heads * d, h),
            "v_proj": (self.kv_heads * d, h),
            "dense": (h, self.num_attention_heads * d),
            "fc1": (i, h),
            "fc2": (h, i),
        }


def model_shape(model_config: Any) -> ModelShape:
    """ModelShape of a PhiConfig-like object, a dict of its fields, or a ModelShape."""
    if isinstance(model_config, ModelShape):
        return model_config
    if isinstance(model_config, Mapping):
        values = dict(model_config)
    elif hasattr(model_config, "to_dict"):  # a transformers config
        values = model_config.to_dict()
    else:
        values = dict(vars(model_config))
    rope = values.get("rope_parameters") or values.get("rope_scaling") or {}
    partial = values.get("partial_rotary_factor")
    if partial is None:
        partial = rope.get("partial_rotary_factor", 0.5) if isinstance(rope, Mapping) else 0.5
    missing = [
        name
        for name in (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "vocab_size",
        )
        if values.get(name) is None
    ]
    if missing:
        raise ValueError(f"the model config lacks {', '.join(missing)}")
    return ModelShape(
        hidden_size=int(values["hidden_size"]),
        intermediate_size=int(values["intermediate_size"]),
        num_hidden_layers=int(values["num_hidden_layers"]),
        num_attention_heads=int(values["num_attention_heads"]),
        vocab_size=int(values["vocab_size"]),
        num_key_value_heads=values.get("num_key_value_heads"),
        head_dim=values.get("head_dim"),
        partial_rotary_factor=float(partial),
        max_position_embeddings=int(values.get("max_position_embeddings") or 2048),
        hidden_act=str(values.get("hidden_act") or "gelu_new"),
        resid_pdrop=float(values.get("resid_pdrop") or 0.0),
        tie_word_embeddings=bool(values.get("tie_word_embeddings", False)),
        qk_layernorm=bool(values.get("qk_layernorm", False)),
    )


def load_model_config(model_name_or_path: str | None, model_config: dict | None = None):
    """The transformers config of a model, without loading weights.

    Order: ``model_config`` (PhiConfig keyword arguments); a local directory with config.json; the
    Hugging Face cache; the table of known shapes (so microsoft/phi-2 works offline); the hub.
    """
    from transformers import AutoConfig, PhiConfig

    if model_config is not None:
        try:
            return PhiConfig(**model_config)
        except (TypeError, ValueError) as error:
            raise Phi2TutorError(f"model.model_config is not a valid PhiConfig: {error}") from None
    if not model_name_or_path:
        raise Phi2TutorError(
            "Give model.model_name_or_path (hub id or local directory) or model.model_config."
        )
    path = Path(model_name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise Phi2TutorError(f"The model directory {str(path)!r} has no config.json.")
        return AutoConfig.from_pretrained(str(path))
    try:
        return AutoConfig.from_pretrained(model_name_or_path, local_files_only=True)
    except (OSError, ValueError):
        pass
    # Known before the network: without a connection the hub client retries for ~25 s.
    if model_name_or_path in KNOWN_MODEL_CONFIGS:
        return PhiConfig(**KNOWN_MODEL_CONFIGS[model_name_or_path])
    try:
        return AutoConfig.from_pretrained(model_name_or_path)
    except (OSError, ValueError) as error:
        raise Phi2TutorError(
            f"Could not read the config of {model_name_or_path!r}: it is not a local directory, not in the "
            f"Hugging Face cache, not reachable on the hub ({first_line(error)}) and not one "
            f"of the shapes known offline ({', '.join(KNOWN_MODEL_CONFIGS)}). Give model.model_config "
            "(PhiConfig fields) or a local directory with config.json."
        ) from None


# --------------------------------------------------------------------------- exact tensor bytes
def quantized_linear_bytes(out_features: int, in_features: int, quantization: str) -> dict[str, int]:
    """Bytes of the frozen weight of one linear layer (without bias), as bitsandbytes stores it.

    Returns ``{"weight": ..., "quant_state": ...}``: the packed/int8/float weight, and the tensors
    that dequantize it (absmax, codes, offset, second-level state; SCB row scales for int8).
    """
    numel = out_features * in_features
    if quantization in ("nf4", "nf4-double"):
        blocks = math.ceil(numel / NF4_BLOCKSIZE)
        packed = (numel + 1) // 2  # two 4-bit values per uint8
        code = NF4_CODE_ENTRIES * 4
        if quantization == "nf4":
            return {"weight": packed, "quant_state": blocks * 4 + code}
        nested_blocks = math.ceil(blocks / NESTED_BLOCKSIZE)
        # uint8 absmax per block; fp32 offset; state2: fp32 absmax per 256 blocks + its own code copy.
        state = blocks + 4 + nested_blocks * 4 + DYNAMIC_CODE_ENTRIES * 4 + code
        return {"weight": packed, "quant_state": state}
    if quantization == "int8":
        return {"weight": numel, "quant_state": out_features * 4}  # int8 CB + fp32 SCB per row
    raise ValueError(f"quantization {quantization!r} is not a bitsandbytes format")


def base_weight_breakdown(
    model_config: Any, quantization: str = "nf4-double", weights_dtype: str = "float16"
) -> Terms:
    """Bytes of the frozen base model's tensors (parameters, quantization state, buffers).

    The decoder's linear layers are quantized; the embeddings, lm_head (transformers never
    quantizes the output embedding), biases and layer norms stay in ``weights_dtype``.
    """
    _check_choice("quantization", quantization, QUANTIZATIONS)
    shape = model_shape(model_config)
    wb = DTYPE_BYTES[weights_dtype]
    h, v, n = shape.hidden_size, shape.vocab_size, shape.num_hidden_layers
    linears = shape.linear_shapes()
    linear_numel = sum(o * i for o, i in linears.values())
    bias_numel = sum(o for o, _ in linears.values())
    norm_numel = 2 * h + (4 * shape.head_size if shape.qk_layernorm else 0)
    terms: Terms = []
    if quantization == "none":
        terms.append((f"decoder linear weights ({n}x{len(linears)}, {weights_dtype})", n * linear_numel * wb))
    else:
        packed = state = 0
        for out_features, in_features in linears.values():
            parts = quantized_linear_bytes(out_features, in_features, quantization)
            packed += parts["weight"]
            state += parts["quant_state"]
        label = "int8" if quantization == "int8" else "4-bit packed"
        terms.append((f"decoder linear weights ({n}x{len(linears)}, {quantization}: {label})", n * packed))
        terms.append(
            (
                f"quantization state ({'SCB row scales' if quantization == 'int8' else 'absmax, codes'})",
                n * state,
            )
        )
    terms.append((f"embed_tokens ({weights_dtype}, not quantized)", v * h * wb))
    if not shape.tie_word_embeddings:
        terms.append((f"lm_head weight + bias ({weights_dtype}, not quantized)", (v * h + v) * wb))
    else:
        terms.append((f"lm_head bias ({weights_dtype})", v * wb))
    terms.append((f"biases and layer norms ({weights_dtype})", (n * (bias_numel + norm_numel) + 2 * h) * wb))
    # inv_freq and original_inv_freq, fp32, (rotary_dim + 1) // 2 entries each
    terms.append(("rotary embedding buffers (fp32)", 2 * ((shape.rotary_dim + 1) // 2) * 4))
    return terms


def lora_parameter_shapes(
    model_config: Any, r: int, target_modules: Sequence[str] = PHI2_LORA_TARGETS
) -> list[tuple[int, int]]:
    """Shapes of every LoRA tensor (A: r x in, B: out x r) of every targeted layer, in model order."""
    shape = model_shape(model_config)
    linears = shape.linear_shapes()
    unknown = [m for m in target_modules if m not in linears]
    if unknown:
        raise ValueError(f"lora_target_modules {unknown} are not linear layers of Phi ({', '.join(linears)})")
    per_layer = []
    for name in target_modules:
        out_features, in_features = linears[name]
        per_layer += [(r, in_features), (out_features, r)]
    return per_layer * shape.num_hidden_layers


def modules_to_save_shapes(model_config: Any, modules_to_save: Sequence[str]) -> list[tuple[int, ...]]:
    """Shapes of the trainable copies peft makes of ``modules_to_save`` (embed_tokens, lm_head)."""
    shape = model_shape(model_config)
    shapes: list[tuple[int, ...]] = []
    for name in modules_to_save:
        if name == "embed_tokens":
            shapes.append((shape.vocab_size, shape.hidden_size))
        elif name == "lm_head":
            shapes += [(shape.vocab_size, shape.hidden_size), (shape.vocab_size,)]
        else:
            raise ValueError(f"modules_to_save {name!r}: the planner knows embed_tokens and lm_head")
    return shapes


def optimizer_state_bytes(
    parameter_numels: Iterable[int], optimizer: str = "paged_adamw8bit", parameter_bytes: int = 4
) -> tuple[int, int]:
    """(bytes in PyTorch's allocator, bytes in paged unified memory) of the optimizer states.

    torch AdamW: exp_avg and exp_avg_sq in the parameter dtype (its step counter stays on the host).
    bitsandbytes 8-bit AdamW: two uint8 states plus two fp32 absmax per 256-value block, one shared
    pair of 256-entry fp32 quantization maps; parameters under 4096 elements keep two fp32 states.
    The paged variant allocates state buffers of >= 100k elements in CUDA unified memory.
    """
    _check_choice("optimizer", optimizer, OPTIMIZERS)
    allocated = paged = 0
    any_8bit = False
    for numel in parameter_numels:
        if optimizer == "adamw":
            allocated += 2 * numel * parameter_bytes
            continue
        if numel < OPTIMIZER_8BIT_MIN_SIZE:
            states = 2 * numel * 4
        else:
            any_8bit = True
            states = 2 * numel
            allocated += 2 * math.ceil(numel / OPTIMIZER_8BIT_BLOCKSIZE) * 4
        if optimizer == "paged_adamw8bit" and numel >= PAGED_MIN_NUMEL:
            paged += states
        else:
            allocated += states
    if any_8bit:
        allocated += 2 * DYNAMIC_CODE_ENTRIES * 4
    return allocated, paged


# --------------------------------------------------------------------------- activations
@dataclass
class _Flow:
    """Dtypes (as byte widths) and options that decide which tensors a training step keeps."""

    shape: ModelShape
    quantization: str
    autocast: bool
    weights_bytes: int
    lora_bytes: int
    lora_targets: tuple[str, ...]
    lora_dropout: float
    lora_r: int
    attention: str
    embed_trainable: bool
    lm_head_trainable: bool

    @property
    def autocast_bytes(self) -> int:
        return 2

    @property
    def quantized(self) -> bool:
        return self.quantization != "none"

    def linear_out(self, in_bytes: int) -> int:
        # bitsandbytes' Linear4bit casts its output back to the input dtype and MatMul8bitLt returns
        # the input dtype; a plain frozen Linear follows autocast.
        if self.quantized:
            return in_bytes
        return self.autocast_bytes if self.autocast else in_bytes

    def lora_in(self) -> int:
        # Under autocast the LoRA Linear casts its input to fp16; without it peft casts the input to
        # the LoRA weight dtype.
        return self.autocast_bytes if self.autocast else self.lora_bytes

    def lora_out(self, base_out: int) -> int:
        return self.autocast_bytes if self.autocast else base_out


def _layer_activations(
    flow: _Flow, x_bytes: int, tokens: int, seq: int, batch: int, input_requires_grad: bool = True
) -> tuple[Terms, int]:
    """Tensors one decoder layer saves for backward, per the code of transformers' PhiDecoderLayer,
    peft's LoRA Linear and bitsandbytes' layers (dropout masks as CUDA's 1-byte bool masks).

    An op saves an input only when the backward needs it: a matmul keeps one operand because the
    other requires grad, a frozen linear keeps nothing of its input. ``input_requires_grad`` is
    false for the first layer when nothing before it is trainable (no gradient checkpointing,
    frozen embeddings): that layer then keeps only what its LoRA weights need.
    Returns the terms and the byte width of the layer's output (the next layer's input).
    """
    s = flow.shape
    h, inter, heads = s.hidden_size, s.intermediate_size, s.num_attention_heads
    lin = s.linear_shapes()
    t = tokens
    ac = flow.autocast_bytes
    terms: Terms = []
    shared: dict[str, int] = {}  # tensors several ops save, counted once
    x_grad = input_requires_grad

    if x_grad:
        # autocast runs layer_norm in fp32: the saved input is an fp32 copy of a 16-bit input
        terms.append(("input_layernorm input", t * h * (4 if flow.autocast else x_bytes)))
        terms.append(("input_layernorm mean/rstd (fp32)", t * 2 * 4))
    y = 4 if flow.autocast else x_bytes  # layernorm output

    def base_and_lora(module: str, src_name: str, src_bytes: int, src_grad: bool) -> tuple[int, bool]:
        out_features, in_features = lin[module]
        base_out = flow.linear_out(src_bytes)
        if flow.quantization == "int8" and src_grad:
            shared[src_name] = t * in_features * src_bytes  # MatMul8bitLt keeps its input
        if module not in flow.lora_targets:
            return base_out, src_grad
        want = flow.lora_in()
        if flow.lora_dropout > 0:
            if src_grad:
                terms.append((f"{module} LoRA dropout mask (bool)", t * in_features))
            terms.append(
                (f"{module} LoRA input (dropout output, {_dtype_name(want)})", t * in_features * want)
            )
        elif want != src_bytes:
            terms.append((f"{module} LoRA input ({_dtype_name(want)} copy)", t * in_features * want))
        else:
            shared[src_name] = t * in_features * src_bytes
        a_out = ac if flow.autocast else flow.lora_bytes
        terms.append((f"{module} LoRA A output", t * flow.lora_r * a_out))
        return max(base_out, flow.lora_out(base_out)), True

    q, q_grad = base_and_lora("q_proj", "layernorm output", y, x_grad)
    k, k_grad = base_and_lora("k_proj", "layernorm output", y, x_grad)
    v, v_grad = base_and_lora("v_proj", "layernorm output", y, x_grad)
    # Rotary embedding: q * cos + rotate_half(q) * sin promotes to the wider of q and cos.
    rope = 4 if flow.embed_trainable else flow.weights_bytes
    q, k = max(q, rope), max(k, rope)
    scores = batch * heads * seq * seq
    scores_grad = q_grad or k_grad
    attn_grad = scores_grad or v_grad
    if flow.attention == "sdpa":
        sdpa = ac if flow.autocast else q
        if attn_grad:
            # memory-efficient kernel: q, k, v, its output and the fp32 logsumexp
            terms.append((f"attention q, k, v, output (sdpa, {_dtype_name(sdpa)})", 4 * t * h * sdpa))
            terms.append(("attention logsumexp (fp32)", batch * heads * math.ceil(seq / 32) * 32 * 4))
        attn_out = sdpa
    else:
        # a matmul keeps each operand for the other's gradient
        if flow.attention == FP32_SCORES_ATTENTION:
            qk_saved = (4, 4)  # query.float() * scale and key.float(), autocast off
            probs = ac if flow.autocast else v  # .to(value.dtype), then autocast's matmul
        else:
            qk_saved = (ac, ac) if flow.autocast else (q, k)
            probs = ac if flow.autocast else q  # .to(query.dtype)
        value = ac if flow.autocast else v
        if k_grad:
            terms.append((f"attention query ({_dtype_name(qk_saved[0])})", t * h * qk_saved[0]))
        if q_grad:
            terms.append((f"attention key ({_dtype_name(qk_saved[1])})", t * h * qk_saved[1]))
        if scores_grad:
            terms.append(("attention probabilities (softmax output, fp32)", scores * 4))
        if v_grad and probs != 4:
            terms.append(
                (f"attention probabilities ({_dtype_name(probs)} copy for probs @ V)", scores * probs)
            )
        elif v_grad and not scores_grad:
            terms.append(("attention probabilities (fp32, for probs @ V)", scores * 4))
        if scores_grad:
            terms.append((f"attention value ({_dtype_name(value)})", t * h * value))
        attn_out = ac if flow.autocast else probs
    dense_out, dense_grad = base_and_lora("dense", "attention output", attn_out, attn_grad)
    if s.resid_pdrop > 0 and dense_grad:
        terms.append(("residual dropout mask, attention branch (bool)", t * h))

    f, f_grad = base_and_lora("fc1", "layernorm output", y, x_grad)
    if f_grad and s.hidden_act == "gelu_new":
        # transformers' NewGELUActivation is Python arithmetic: pow keeps x, tanh its output, and
        # the final product both factors.
        terms.append((f"MLP fc1 output and gelu_new intermediates (4 x {_dtype_name(f)})", 4 * t * inter * f))
    elif f_grad:
        terms.append((f"MLP fc1 output ({_dtype_name(f)})", t * inter * f))
    ff, ff_grad = base_and_lora("fc2", "MLP activation output", f, f_grad)
    if s.resid_pdrop > 0 and ff_grad:
        terms.append(("residual dropout mask, MLP branch (bool)", t * h))
    for name, nbytes in shared.items():
        terms.append((f"{name} (kept for LoRA/int8)", nbytes))
    return terms, max(dense_out, ff, x_bytes)


def _layer_constants(flow: _Flow) -> Terms:
    """Per-layer tensors independent of the number of tokens: autocast's fp16 weight copies."""
    if not flow.autocast:
        return []
    s = flow.shape
    lin = s.linear_shapes()
    lora = sum(flow.lora_r * (o + i) for m, (o, i) in lin.items() if m in flow.lora_targets)
    terms = [("autocast fp16 copies of LoRA weights", lora * flow.autocast_bytes)]
    if flow.weights_bytes != flow.autocast_bytes:
        # layer_norm weight/bias to fp32 (autocast), frozen fp32 Linear weights to fp16
        terms.append(("autocast copies of layer norm weights (fp32)", 2 * s.hidden_size * 4))
        if not flow.quantized:
            terms.append(
                ("autocast fp16 copies of frozen linear weights", sum(o * i for o, i in lin.values()) * 2)
            )
    return terms


def _attention_mask_bytes(flow: _Flow, batch: int, seq: int) -> int:
    if flow.attention == "sdpa":
        return batch * seq * seq if batch > 1 else 0  # bool mask only when padding is present
    return batch * seq * seq * (4 if flow.embed_trainable else flow.weights_bytes)


def _sum(terms: Terms) -> int:
    return sum(nbytes for _, nbytes in terms)


def _dtype_name(nbytes: int) -> str:
    return {1: "int8", 2: "fp16", 4: "fp32"}[nbytes]


def _check_choice(option: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise ValueError(f"{option} {value!r} is not one of {', '.join(map(str, choices))}")


# --------------------------------------------------------------------------- the estimate
@dataclass
class MemoryEstimate:
    """Estimated memory of one training configuration; byte counts, MB properties for display."""

    model: ModelShape
    settings: dict[str, Any]
    breakdown: Terms  # tensors in PyTorch's allocator at the peak; sums to the peak allocated
    outside_allocator: Terms  # paged optimizer states, allocator reserve, CUDA context
    peak_phase: str
    phases: dict[str, Terms]  # allocator terms at each candidate peak of a step
    phase_groups: dict[str, list[tuple[str, Terms]]]  # the same, by term function
    weight_bytes: int
    trainable_parameter_count: int
    trainable_parameter_bytes: int
    gradient_bytes: int
    optimizer_state_bytes: int  # including paged states
    paged_optimizer_state_bytes: int
    model_name: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def phase_peaks(self) -> Terms:
        """Allocated bytes at each candidate peak of a step."""
        return [(name, _sum(terms)) for name, terms in self.phases.items()]

    @property
    def estimated_peak_allocated_bytes(self) -> int:
        return _sum(self.breakdown)

    @property
    def estimated_peak_bytes(self) -> int:
        return self.estimated_peak_allocated_bytes + _sum(self.outside_allocator)

    @property
    def estimated_peak_allocated_mb(self) -> float:
        """What torch.cuda.max_memory_allocated would report, in MB."""
        return self.estimated_peak_allocated_bytes / MB

    @property
    def estimated_peak_mb(self) -> float:
        """What the card must hold: allocated + allocator reserve + paged states + CUDA context."""
        return self.estimated_peak_bytes / MB

    def fits(self, budget_mb: float) -> bool:
        return self.estimated_peak_mb <= budget_mb

    def to_dict(self, budget_mb: float | None = None, max_micro_batch: int | None = None) -> dict[str, Any]:
        """JSON-ready summary; ``budget_mb`` adds fits and percent_of_budget."""

        def rows(terms: Terms) -> list[dict[str, Any]]:
            return [{"name": name, "bytes": nbytes, "mb": round(nbytes / MB, 2)} for name, nbytes in terms]

        result: dict[str, Any] = {
            "model_name": self.model_name,
            "estimated_peak_mb": round(self.estimated_peak_mb, 2),
            "estimated_peak_allocated_mb": round(self.estimated_peak_allocated_mb, 2),
            "peak_phase": self.peak_phase,
            "breakdown": rows(self.breakdown),
            "outside_allocator": rows(self.outside_allocator),
            "phase_peaks_allocated": rows(self.phase_peaks),
            "weight_mb": round(self.weight_bytes / MB, 2),
            "trainable_parameters": self.trainable_parameter_count,
            "optimizer_state_mb": round(self.optimizer_state_bytes / MB, 2),
            "settings": dict(self.settings),
            "model": asdict(self.model),
            "notes": list(self.notes),
        }
        if budget_mb is not None:
            result["budget_mb"] = budget_mb
            result["fits"] = self.fits(budget_mb)
            result["percent_of_budget"] = round(100 * self.estimated_peak_mb / budget_mb, 1)
        if max_micro_batch is not None:
            result["max_micro_batch"] = max_micro_batch
        return result


@dataclass
class _Step:
    """A training step's numbers that the term functions share: shape, settings, dtypes, sizes."""

    shape: ModelShape
    settings: dict[str, Any]
    flow: _Flow
    autocast: bool
    trainable_bytes: int
    weights_bytes: int
    tokens: int
    loss_tokens: int
    lora_numel: int
    saved_numel: int
    numels: list[int]
    x_bytes: list[int]  # byte width of each decoder layer's input (and, last, the final norm's)
    layer_terms: list[Terms]  # what each decoder layer saves for backward
    constants: Terms  # per-layer tensors independent of the tokens (autocast weight copies)

    def __getattr__(self, name: str) -> Any:
        # settings by name: step.optimizer, step.micro_batch, ...
        try:
            return self.__dict__["settings"][name]
        except KeyError:
            raise AttributeError(name) from None

    @property
    def layers(self) -> int:
        return self.shape.num_hidden_layers

    @property
    def trainable_numel(self) -> int:
        return self.lora_numel + self.saved_numel

    @property
    def grad_dtype(self) -> str:
        return _dtype_name(self.trainable_bytes)

    @property
    def final_norm_out_bytes(self) -> int:
        return 4 if self.autocast else self.x_bytes[-1]  # autocast runs layer_norm in fp32

    @property
    def logits_bytes(self) -> int:
        return 2 if self.autocast else (4 if self.flow.lm_head_trainable else self.weights_bytes)

    @property
    def optimizer_states(self) -> tuple[int, int]:
        return optimizer_state_bytes(self.numels, self.optimizer, self.trainable_bytes)


# --------------------------------------------------------------------------- terms
# Each function is one group of terms; PHASES below says which groups are alive at each candidate peak.
def frozen_weights(step: _Step) -> Terms:
    terms = base_weight_breakdown(step.shape, step.quantization, step.compute_dtype)
    if step.embeddings_on_cpu:  # the table stays in CPU memory; its looked-up rows are the layer-0 input
        terms = [(name, nbytes) for name, nbytes in terms if not name.startswith("embed_tokens")]
    return terms


def trainable_weights(step: _Step) -> Terms:
    terms = [
        (
            f"LoRA weights (r={step.lora_r}, {len(step.lora_target_modules)} modules x {step.layers} layers, "
            f"{_dtype_name(step.trainable_bytes)})",
            step.lora_numel * step.trainable_bytes,
        )
    ]
    if step.saved_numel:
        terms.append(
            (
                f"trainable copies of {', '.join(step.modules_to_save)}",
                step.saved_numel * step.trainable_bytes,
            )
        )
    return terms


def optimizer_states(step: _Step) -> Terms:
    return [(f"optimizer states ({step.optimizer})", step.optimizer_states[0])]


def _gradients(step: _Step, share: int, when: str) -> Terms:
    total = step.trainable_numel * step.trainable_bytes
    if step.accumulate_grad_batches > 1:
        return [(f"gradients ({step.grad_dtype}, kept across accumulated micro-batches)", total)]
    return [(f"gradients ({step.grad_dtype}{when})", share)] if share else []


def previous_step_gradients(step: _Step) -> Terms:
    # Lightning zeroes gradients after the training step's forward, before its backward: the previous
    # step's gradients are alive through the forward.
    return _gradients(step, step.trainable_numel * step.trainable_bytes, ", of the previous step")


def accumulated_gradients(step: _Step) -> Terms:
    return _gradients(step, 0, "")


def last_layer_gradients(step: _Step) -> Terms:
    # At the backward of the last decoder layer: its LoRA gradients, and a trainable lm_head's.
    lm_head_numel = (step.shape.vocab_size * step.shape.hidden_size + step.shape.vocab_size) * (
        "lm_head" in step.modules_to_save
    )
    return _gradients(step, (step.lora_numel // step.layers + lm_head_numel) * step.trainable_bytes, "")


def all_gradients(step: _Step) -> Terms:
    return _gradients(step, step.trainable_numel * step.trainable_bytes, "")


def gradients_before_first_layer(step: _Step) -> Terms:
    # The first layer's own LoRA gradients are written at the end of its backward, after its peak.
    own = step.lora_numel // step.layers
    return _gradients(step, (step.trainable_numel - own) * step.trainable_bytes, "")


def _rotary_and_mask(step: _Step) -> Terms:
    seq = step.max_length
    return [
        # of one row of position ids (int64), which the layers' checkpoints hold too
        ("rotary cos/sin and position ids", 2 * seq * step.shape.rotary_dim * step.x_bytes[0] + seq * 8),
        ("attention mask", _attention_mask_bytes(step.flow, step.micro_batch, seq)),
    ]


def _checkpoint_input_bytes(step: _Step, layers: range) -> int:
    # With offloading the inputs wait in CPU memory, except layer 0's: the embedding output is a leaf that
    # requires grad (enable_input_require_grads), which autograd holds on the device until the step ends.
    if step.offload_checkpoints:
        layers = range(min(1, len(layers)))
    h = step.shape.hidden_size
    return sum(step.tokens * h * step.x_bytes[index] for index in layers)


def kept_activations(step: _Step) -> Terms:
    """Held from the forward to the backward of every layer: checkpointed inputs or all saved tensors."""
    n = step.layers
    if step.gradient_checkpointing:
        # every layer's input (held by its checkpoint) and the tensors the checkpoints' keyword
        # arguments hold (rotary cos/sin, attention mask)
        return [
            ("checkpointed decoder layer inputs", _checkpoint_input_bytes(step, range(n)))
        ] + _rotary_and_mask(step)
    per_layer = [(f"{name} (all layers)", nbytes * n) for name, nbytes in step.constants]
    return (
        [("activations of all decoder layers", sum(_sum(t) for t in step.layer_terms))]
        + _rotary_and_mask(step)[:1]
        + per_layer
    )


def kept_for_first_layer(step: _Step) -> Terms:
    """What is still held when only the first layer's backward is left."""
    if step.gradient_checkpointing:
        return [
            ("checkpointed input of decoder layer 0", _checkpoint_input_bytes(step, range(1)))
        ] + _rotary_and_mask(step)
    return (
        [("activations of decoder layer 0", _sum(step.layer_terms[0]))]
        + _rotary_and_mask(step)[:1]
        + step.constants
    )


def forward_only(step: _Step) -> Terms:
    """Alive during the forward only. Lightning's autocast runs with cache_enabled=False, so the fp16
    casts of the LoRA weights are saved by each layer's graph (recomputed under checkpointing), never
    cached for the whole forward. Without checkpointing the attention mask is freed after the forward."""
    if step.gradient_checkpointing:
        return []
    return _rotary_and_mask(step)[1:]


def _recompute(step: _Step, index: int) -> Terms:
    if not step.gradient_checkpointing:
        return []
    terms = [(f"recomputed layer: {name}", nbytes) for name, nbytes in step.layer_terms[index]]
    if (4 if step.autocast else step.x_bytes[index]) == step.x_bytes[index]:
        # the layer norm saves the checkpointed input itself, already counted
        terms = [(k, nb) for k, nb in terms if "input_layernorm input" not in k]
    if step.offload_checkpoints and index > 0:
        h = step.shape.hidden_size
        terms.insert(
            0,
            ("checkpointed input of this layer, back from CPU memory", step.tokens * h * step.x_bytes[index]),
        )
    return terms + [(f"recomputed layer: {name}", nbytes) for name, nbytes in step.constants]


def recompute_last_layer(step: _Step) -> Terms:
    return _recompute(step, step.layers - 1)


def recompute_first_layer(step: _Step) -> Terms:
    return _recompute(step, 0)


def layer_backward_work(step: _Step) -> Terms:
    """Backward transients of one layer: fp32 gradients of the attention probabilities, three MLP-wide
    gradients, or the dequantized frozen weight bitsandbytes builds for the input gradient."""
    shape, tokens = step.shape, step.tokens
    largest_linear = max(o * i for o, i in shape.linear_shapes().values())
    scores = step.micro_batch * shape.num_attention_heads * step.max_length**2
    candidates = {
        "attention-probability gradients (fp32)": (
            8 * scores if step.attention != "sdpa" else 3 * tokens * shape.hidden_size * 4
        ),
        "MLP gradients": 3 * tokens * shape.intermediate_size * 4,
        "dequantized frozen weight": largest_linear * (2 if step.autocast else step.weights_bytes)
        if step.quantization != "none"
        else 0,
    }
    name = max(candidates, key=candidates.__getitem__)
    return [
        (f"backward transient of one layer: {name}", candidates[name]),
        ("hidden-state gradients (residual stream)", 2 * tokens * shape.hidden_size * max(step.x_bytes)),
    ]


def final_norm_kept(step: _Step) -> Terms:
    h, tokens = step.shape.hidden_size, step.tokens
    # its input is the last layer's output, saved inside the decoder (in CPU memory with offloading)
    norm_input = 0 if step.offload_checkpoints else tokens * h * step.final_norm_out_bytes
    terms = [("final layernorm input and mean/rstd", norm_input + tokens * 8)]
    if step.flow.lm_head_trainable:
        terms.append(
            ("lm_head input saved for its weight gradient", step.loss_tokens * h * step.logits_bytes)
        )
    if step.autocast and (step.weights_bytes == 4 or step.flow.lm_head_trainable):
        terms.append(("autocast fp16 copy of the lm_head weight", step.shape.vocab_size * h * 2))
    return terms


def head_forward(step: _Step) -> Terms:
    # TutorModule.target_token_loss holds last_hidden_state through the loss; the answer positions it
    # gathers (and their fp16 cast for lm_head) are freed once lm_head has run, before the log-softmax.
    return [
        (
            "final layernorm output (last_hidden_state)",
            step.tokens * step.shape.hidden_size * step.final_norm_out_bytes,
        )
    ]


def logits(step: _Step) -> Terms:
    v, nbytes = step.shape.vocab_size, step.logits_bytes
    terms = [
        (
            f"logits at {step.loss_tokens} answer positions ({_dtype_name(nbytes)})",
            step.loss_tokens * v * nbytes,
        )
    ]
    if nbytes != 4:
        terms.append(("logits upcast to fp32 for the loss", step.loss_tokens * v * 4))
    return terms


def log_softmax_saved(step: _Step) -> Terms:
    return [("log-softmax saved for backward (fp32)", step.loss_tokens * step.shape.vocab_size * 4)]


def loss_gradients(step: _Step) -> Terms:
    v = step.shape.vocab_size
    return [
        ("gradient of the log-softmax output (fp32)", step.loss_tokens * v * 4),
        ("gradient of the logits (fp32)", step.loss_tokens * v * 4),
    ]


def embedding_output_and_gradient(step: _Step) -> Terms:
    """Under checkpointing with frozen embeddings the embedding output is a leaf that requires grad: it and
    the gradient autograd accumulates into it stay until the step's graph is released."""
    if not step.gradient_checkpointing or step.flow.embed_trainable:
        return []
    nbytes = step.tokens * step.shape.hidden_size * step.x_bytes[0]
    return [("embedding output (a grad-requiring leaf) and its gradient", 2 * nbytes)]


def optimizer_temporaries(step: _Step) -> Terms:
    if step.optimizer != "adamw":
        return []
    return [("optimizer temporaries (torch AdamW foreach)", step.trainable_numel * step.trainable_bytes)]


TermFunction = Callable[[_Step], Terms]
PERSISTENT: tuple[TermFunction, ...] = (frozen_weights, trainable_weights, optimizer_states)
# The candidate peaks of a step and the groups of terms alive at each. Optimizer states count from
# the second step on, when the peak is reached.
PHASES: dict[str, tuple[TermFunction, ...]] = {
    "loss forward": (
        *PERSISTENT,
        previous_step_gradients,
        kept_activations,
        forward_only,
        final_norm_kept,
        head_forward,
        logits,
        log_softmax_saved,
    ),
    "loss backward": (
        *PERSISTENT,
        accumulated_gradients,
        kept_activations,
        final_norm_kept,
        log_softmax_saved,
        loss_gradients,
    ),
    "backward of the last decoder layer": (
        *PERSISTENT,
        last_layer_gradients,
        kept_activations,
        recompute_last_layer,
        layer_backward_work,
    ),
    "backward of the first decoder layer": (
        *PERSISTENT,
        gradients_before_first_layer,
        kept_for_first_layer,
        recompute_first_layer,
        layer_backward_work,
    ),
    "optimizer step": (*PERSISTENT, all_gradients, embedding_output_and_gradient, optimizer_temporaries),
}


def _build_step(shape: ModelShape, settings: dict[str, Any]) -> _Step:
    autocast, trainable_bytes = PRECISIONS[settings["precision"]]
    wb = DTYPE_BYTES[settings["compute_dtype"]]
    modules_to_save = settings["modules_to_save"]
    flow = _Flow(
        shape=shape,
        quantization=settings["quantization"],
        autocast=autocast,
        weights_bytes=wb,
        lora_bytes=trainable_bytes,
        lora_targets=tuple(settings["lora_target_modules"]),
        lora_dropout=settings["lora_dropout"],
        lora_r=settings["lora_r"],
        attention=settings["attention"],
        embed_trainable="embed_tokens" in modules_to_save,
        lm_head_trainable="lm_head" in modules_to_save,
    )
    lora_shapes = lora_parameter_shapes(shape, settings["lora_r"], settings["lora_target_modules"])
    saved_shapes = modules_to_save_shapes(shape, modules_to_save)
    b, seq = settings["micro_batch"], settings["max_length"]
    tokens = b * seq
    loss_tokens = max(1, math.ceil(tokens * settings["loss_token_fraction"]))
    if settings["loss_chunk_tokens"]:
        loss_tokens = min(loss_tokens, settings["loss_chunk_tokens"])
    layer_terms: list[Terms] = []
    x_bytes = [4 if flow.embed_trainable else wb]
    for index in range(shape.num_hidden_layers):
        # Without checkpointing (which makes the embedding output require grad) and with frozen
        # embeddings, the first layer's input needs no gradient.
        input_requires_grad = index > 0 or settings["gradient_checkpointing"] or flow.embed_trainable
        terms, out_bytes = _layer_activations(flow, x_bytes[-1], tokens, seq, b, input_requires_grad)
        layer_terms.append(terms)
        x_bytes.append(out_bytes)
    return _Step(
        shape=shape,
        settings=settings,
        flow=flow,
        autocast=autocast,
        trainable_bytes=trainable_bytes,
        weights_bytes=wb,
        tokens=tokens,
        loss_tokens=loss_tokens,
        lora_numel=sum(math.prod(s) for s in lora_shapes),
        saved_numel=sum(math.prod(s) for s in saved_shapes),
        numels=[math.prod(s) for s in lora_shapes + saved_shapes],
        x_bytes=x_bytes,
        layer_terms=layer_terms,
        constants=_layer_constants(flow),
    )


def estimate_memory(
    model_config: Any,
    *,
    quantization: str = "nf4-double",
    compute_dtype: str = "float16",
    precision: str = "16-mixed",
    lora_r: int = 16,
    lora_target_modules: Sequence[str] = PHI2_LORA_TARGETS,
    lora_dropout: float = 0.05,
    modules_to_save: Sequence[str] = (),
    optimizer: str = "paged_adamw8bit",
    micro_batch: int = 1,
    max_length: int = 512,
    gradient_checkpointing: bool = True,
    embeddings_on_cpu: bool = False,
    offload_checkpoints: bool = False,
    accumulate_grad_batches: int = 1,
    attention: str = FP32_SCORES_ATTENTION,
    loss_token_fraction: float = 1.0,
    loss_chunk_tokens: int | None = None,
    cuda_context_mb: float = DEFAULT_CUDA_CONTEXT_MB,
    allocator_overhead_fraction: float = DEFAULT_ALLOCATOR_OVERHEAD_FRACTION,
    model_name: str | None = None,
) -> MemoryEstimate:
    """Peak GPU memory of a LoRA/QLoRA training step of a PhiForCausalLM, from its shape alone.

    The step is TutorModule's: frozen base (bitsandbytes ``quantization``, other tensors in
    ``compute_dtype``), LoRA weights in fp32 (16-bit under ``16-true``/``bf16-true``), Lightning
    ``precision``, loss on answer tokens only (``loss_token_fraction`` of the ``micro_batch`` x
    ``max_length`` positions get logits; ``loss_chunk_tokens`` caps them when the loss is chunked).

    The peak is the largest of the moments in PHASES, each a sum of term functions: the loss forward
    (all kept activations plus logits, their fp32 upcast and the log-softmax), the loss backward (three
    fp32 vocabulary-wide buffers), the backward of the last and of the first decoder layer (one layer's
    activations, recomputed under gradient checkpointing, plus its backward transients), and the
    optimizer step. Sizes in bytes; MB means MiB.
    """
    _check_choice("quantization", quantization, QUANTIZATIONS)
    _check_choice("compute_dtype", compute_dtype, tuple(DTYPE_BYTES))
    _check_choice("precision", precision, tuple(PRECISIONS))
    _check_choice("optimizer", optimizer, OPTIMIZERS)
    _check_choice("attention", attention, ATTENTIONS)
    if micro_batch < 1 or max_length < 1 or lora_r < 1 or accumulate_grad_batches < 1:
        raise ValueError("micro_batch, max_length, lora_r and accumulate_grad_batches must be >= 1")
    if not 0 < loss_token_fraction <= 1:
        raise ValueError("loss_token_fraction must be in (0, 1]")
    shape = model_shape(model_config)
    settings = {
        "quantization": quantization,
        "compute_dtype": compute_dtype,
        "precision": precision,
        "lora_r": lora_r,
        "lora_target_modules": list(lora_target_modules),
        "lora_dropout": lora_dropout,
        "modules_to_save": list(modules_to_save),
        "optimizer": optimizer,
        "micro_batch": micro_batch,
        "max_length": max_length,
        "gradient_checkpointing": gradient_checkpointing,
        "embeddings_on_cpu": embeddings_on_cpu,
        "offload_checkpoints": offload_checkpoints and gradient_checkpointing,
        "accumulate_grad_batches": accumulate_grad_batches,
        "attention": attention,
        "loss_token_fraction": loss_token_fraction,
        "loss_chunk_tokens": loss_chunk_tokens,
        "cuda_context_mb": cuda_context_mb,
        "allocator_overhead_fraction": allocator_overhead_fraction,
    }
    step = _build_step(shape, settings)
    groups = {
        phase: [(function.__name__, function(step)) for function in functions]
        for phase, functions in PHASES.items()
    }
    phases = {phase: [term for _, terms in named for term in terms] for phase, named in groups.items()}
    peak_phase = max(phases, key=lambda phase: _sum(phases[phase]))
    breakdown = [(name, nbytes) for name, nbytes in phases[peak_phase] if nbytes]
    peak_allocated = _sum(breakdown)
    opt_allocated, opt_paged = step.optimizer_states
    outside: Terms = []
    if opt_paged:
        outside.append(("paged optimizer states (CUDA unified memory)", opt_paged))
    outside.append(
        (
            f"allocator reserve and fragmentation ({allocator_overhead_fraction:.0%})",
            int(peak_allocated * allocator_overhead_fraction),
        )
    )
    outside.append(("CUDA context (driver, cuBLAS)", int(cuda_context_mb * MB)))
    notes = []
    if embeddings_on_cpu:
        notes.append(
            f"embeddings_on_cpu: the {shape.vocab_size * shape.hidden_size * DTYPE_BYTES[compute_dtype] / MB:.0f} MB embedding table is in CPU memory."
        )
    if settings["offload_checkpoints"]:
        notes.append("offload_checkpoints: the checkpointed layer inputs wait in pinned CPU memory.")
    if attention == "sdpa":
        notes.append("sdpa assumes the memory-efficient kernel (no seq x seq scores kept).")
    if quantization == "int8":
        notes.append("int8: outlier columns (LLM.int8 threshold) are not counted.")
    trainable_total = step.trainable_numel * step.trainable_bytes
    return MemoryEstimate(
        model=shape,
        settings=settings,
        breakdown=breakdown,
        outside_allocator=outside,
        peak_phase=peak_phase,
        phases=phases,
        phase_groups=groups,
        weight_bytes=_sum(frozen_weights(step)),
        trainable_parameter_count=step.trainable_numel,
        trainable_parameter_bytes=trainable_total,
        gradient_bytes=trainable_total,
        optimizer_state_bytes=opt_allocated + opt_paged,
        paged_optimizer_state_bytes=opt_paged,
        model_name=model_name,
        notes=notes,
    )


def max_micro_batch_that_fits(model_config: Any, budget_mb: float, limit: int = 1024, **settings: Any) -> int:
    """Largest micro-batch whose estimated peak (card total) fits ``budget_mb``; 0 if none does."""
    settings.pop("micro_batch", None)
    best = 0
    for micro_batch in range(1, limit + 1):
        if not estimate_memory(model_config, micro_batch=micro_batch, **settings).fits(budget_mb):
            break  # the estimate grows with the micro-batch
        best = micro_batch
    return best


def estimate_settings(estimate: MemoryEstimate) -> dict[str, Any]:
    """The keyword arguments that reproduce ``estimate`` with estimate_memory."""
    return {**estimate.settings, "model_name": estimate.model_name}


def ways_to_fit(settings: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """What lowers a training step's peak, for a configuration's planner settings (None: not known): one
    ``{"kind": ..., "now": ...}`` per change, leaving out what the run already does. GPUMemoryProfiler's
    out-of-memory message and the report word them (phi2tutor.report.text.fitting_advice)."""
    s = settings or {}
    advice: list[dict[str, Any]] = [
        {"kind": "micro_batch", "now": s.get("micro_batch")},
        {"kind": "max_length", "now": s.get("max_length")},
    ]
    if not s.get("gradient_checkpointing", False):
        advice.append({"kind": "gradient_checkpointing"})
    if s.get("quantization") not in ("nf4", "nf4-double"):
        advice.append({"kind": "nf4"})
    if s.get("optimizer") not in ("adamw8bit", "paged_adamw8bit"):
        advice.append({"kind": "paged_optimizer"})
    return advice


# --------------------------------------------------------------------------- data.batch_size: auto
AUTO_BATCH = "auto"
# auto keeps the planned peak (worst case: every position an answer token; allocator reserve and CUDA
# context included) at least this share under the budget. The planner matched a measured step within 0.1%
# on the CPU but has not been checked on a GPU, whose kernels add workspaces (cuBLAS, bitsandbytes'
# dequantization buffers) it does not count; 10% is also the line above which GPUMemoryProfiler warns
# (its default warn_fraction 0.9), so an auto run does not start in the warning zone.
AUTO_BATCH_MARGIN = 0.10


def auto_budget(profiler_budget_mb: float | None, device_memory_mb: float | None) -> tuple[float, str]:
    """The budget ``data.batch_size: auto`` plans for, and where it comes from.

    The config's GPUMemoryProfiler budget_mb (the card the run is meant for), capped on a CUDA device by
    that device's total memory; without a profiler the device's memory; with neither (no CUDA device) the
    default budget, DEFAULT_BUDGET_MB, the 4 GB card this project targets.
    """
    if profiler_budget_mb is not None:
        if device_memory_mb is not None and device_memory_mb < profiler_budget_mb:
            return device_memory_mb, (
                f"the CUDA device's total memory, under GPUMemoryProfiler.budget_mb {profiler_budget_mb:.0f}"
            )
        return profiler_budget_mb, "GPUMemoryProfiler.budget_mb"
    if device_memory_mb is not None:
        return device_memory_mb, "the CUDA device's total memory"
    return DEFAULT_BUDGET_MB, (
        "the default, as the config has no GPUMemoryProfiler budget_mb (on a CUDA device fit plans for the "
        "device's memory instead; add callbacks.memory.GPUMemoryProfiler with budget_mb to choose)"
    )


def effective_batch_size(
    configured: int | None, accumulate_grad_batches: int, replicas: int
) -> tuple[int, str]:
    """Examples per optimizer step, over all devices, and where the number comes from: data.effective_batch_size
    when set, else what the config trains at micro-batch 1 (trainer.accumulate_grad_batches x devices x nodes;
    the shipped configs' micro-batch 1 x accumulation 16 keeps its 16)."""
    if configured is not None:
        return configured, "data.effective_batch_size"
    return accumulate_grad_batches * replicas, (
        "trainer.accumulate_grad_batches x devices x nodes, the config's accumulation at micro-batch 1"
    )


def accumulation_for(
    effective: int, micro_batch: int, replicas: int, source: str = "the effective batch"
) -> int:
    """trainer.accumulate_grad_batches that makes micro_batch x accumulation x replicas == effective."""
    if effective % (micro_batch * replicas):
        raise ValueError(
            f"the effective batch {effective} ({source}) is not a multiple of micro-batch {micro_batch} x "
            f"{replicas} device(s), so no whole trainer.accumulate_grad_batches keeps it: give "
            "data.effective_batch_size a multiple of that, another data.batch_size, or data.batch_size: auto "
            "(it picks a micro-batch that divides the effective batch)"
        )
    return effective // (micro_batch * replicas)


def smaller_micro_batch(per_device: int, micro_batch: int) -> int | None:
    """The next micro-batch below ``micro_batch`` that divides ``per_device`` examples (None below 1)."""
    return next((size for size in range(micro_batch - 1, 0, -1) if per_device % size == 0), None)


@dataclass
class MicroBatchChoice:
    """What ``data.batch_size: auto`` picked: the micro-batch, the accumulation that keeps the effective
    batch, and the planner's figures behind them."""

    micro_batch: int
    accumulate_grad_batches: int
    effective_batch_size: int
    replicas: int
    budget_mb: float
    margin: float
    largest_within_margin: int  # 0: not even micro-batch 1 is planned under the margin
    estimate: MemoryEstimate  # at micro_batch and accumulate_grad_batches

    @property
    def limit_mb(self) -> float:
        return self.budget_mb * (1 - self.margin)

    @property
    def fits(self) -> bool:
        return self.largest_within_margin >= 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "micro_batch": self.micro_batch,
            "accumulate_grad_batches": self.accumulate_grad_batches,
            "effective_batch_size": self.effective_batch_size,
            "replicas": self.replicas,
            "budget_mb": round(self.budget_mb, 1),
            "margin": self.margin,
            "limit_mb": round(self.limit_mb, 1),
            "largest_within_margin": self.largest_within_margin,
            "planned_peak_mb": round(self.estimate.estimated_peak_mb, 1),
            "planned_peak_allocated_mb": round(self.estimate.estimated_peak_allocated_mb, 1),
        }

    def describe(self) -> str:
        """One paragraph: the numbers auto picked and why."""
        devices = f"{self.replicas} device{'s' if self.replicas != 1 else ''}"
        text = (
            f"micro-batch {self.micro_batch} x accumulation {self.accumulate_grad_batches} x {devices} = "
            f"effective batch {self.effective_batch_size}; planned peak {self.estimate.estimated_peak_mb:.1f} MB "
            f"({100 * self.estimate.estimated_peak_mb / self.budget_mb:.1f}% of {self.budget_mb:.0f} MB). "
        )
        per_device = self.effective_batch_size // self.replicas
        if not self.fits:
            return text + (
                f"Not even micro-batch 1 is planned under {self.limit_mb:.0f} MB ({self.margin:.0%} margin): "
                "auto uses 1; lower data.max_length or the memory options (phi2tutor plan shows the terms)."
            )
        text += f"The largest micro-batch planned under {self.limit_mb:.0f} MB ({self.margin:.0%} margin) is "
        if self.largest_within_margin >= per_device:
            return text + f"at least the {per_device} examples per device of the effective batch."
        text += f"{self.largest_within_margin}"
        if self.micro_batch != self.largest_within_margin:
            text += f"; {self.micro_batch} is the largest that divides the {per_device} examples per device"
        return text + "."


def choose_micro_batch(
    estimate: MemoryEstimate,
    budget_mb: float,
    effective_batch_size: int,
    replicas: int = 1,
    margin: float = AUTO_BATCH_MARGIN,
) -> MicroBatchChoice:
    """``data.batch_size: auto``: the largest micro-batch whose planned peak stays ``margin`` under the budget
    and divides the effective batch's share of each device, with the accumulation that keeps the effective
    batch exact (a gradient over the same examples: phi2tutor weighs accumulated steps by tokens).

    ``estimate`` is any estimate of the configuration (its micro-batch and accumulation are replaced).
    Not even micro-batch 1 fitting is reported (``fits`` False) with micro-batch 1, not raised.
    """
    if replicas < 1 or effective_batch_size < 1:
        raise ValueError("the effective batch and the number of devices must be >= 1")
    if effective_batch_size % replicas:
        raise ValueError(
            f"the effective batch {effective_batch_size} is not a multiple of the {replicas} devices "
            "(devices x nodes): every device trains the same number of examples per step"
        )
    per_device = effective_batch_size // replicas
    settings = estimate_settings(estimate)
    limit_mb = budget_mb * (1 - margin)
    largest = max_micro_batch_that_fits(estimate.model, limit_mb, limit=per_device, **settings)
    micro_batch = max(size for size in range(1, max(largest, 1) + 1) if per_device % size == 0)
    accumulation = per_device // micro_batch
    settings.update(micro_batch=micro_batch, accumulate_grad_batches=accumulation)
    return MicroBatchChoice(
        micro_batch=micro_batch,
        accumulate_grad_batches=accumulation,
        effective_batch_size=effective_batch_size,
        replicas=replicas,
        budget_mb=budget_mb,
        margin=margin,
        largest_within_margin=largest,
        estimate=estimate_memory(estimate.model, **settings),
    )


def configured_replicas(devices: Any, num_nodes: Any = 1) -> int | None:
    """Processes a Trainer config trains on (devices x num_nodes) when the config says it: an int, a list of
    device ids or a "0,1" string; None for "auto" and -1 (all devices of the machine that runs it)."""
    nodes = int(num_nodes or 1)
    if isinstance(devices, bool) or devices is None:
        return None
    if isinstance(devices, int):
        return devices * nodes if devices > 0 else None
    if isinstance(devices, (list, tuple)):
        return len(devices) * nodes or None
    text = str(devices).strip()
    if "," in text:
        return len([part for part in text.split(",") if part.strip()]) * nodes
    if text.isdigit() and int(text) > 0:
        return int(text) * nodes
    return None


def format_breakdown_table(estimate: MemoryEstimate, budget_mb: float = DEFAULT_BUDGET_MB) -> str:
    """The estimate as a text table: allocator terms at the peak, what lies outside, the verdict."""
    s = estimate.settings
    width = max(64, *(len(name) + 2 for name, _ in estimate.breakdown + estimate.outside_allocator))
    checkpointing = "on" if s["gradient_checkpointing"] else "off"
    lines = [
        f"Memory plan: {estimate.model_name or 'model'} | {s['quantization']} base, {s['compute_dtype']} | "
        f"LoRA r={s['lora_r']} on {len(s['lora_target_modules'])} modules | {s['optimizer']} | "
        f"precision {s['precision']} | micro-batch {s['micro_batch']} x {s['max_length']} tokens | "
        f"gradient checkpointing {checkpointing} | attention {s['attention']}",
        f"Peak of a training step: {estimate.peak_phase}",
        f"{'term':<{width}} {'MB':>9}",
        "-" * (width + 10),
    ]
    # Terms under 0.05 MB would print as 0.0: sum them into one row.
    shown = [(name, nbytes) for name, nbytes in estimate.breakdown if nbytes >= 0.05 * MB]
    small = [nbytes for _, nbytes in estimate.breakdown if nbytes < 0.05 * MB]
    if small:
        shown.append((f"other terms under 0.05 MB ({len(small)})", sum(small)))
    lines += [f"{name:<{width}} {nbytes / MB:>9.1f}" for name, nbytes in shown]
    lines.append("-" * (width + 10))
    lines.append(
        f"{'= estimated peak allocated (torch.cuda.max_memory_allocated)':<{width}} "
        f"{estimate.estimated_peak_allocated_mb:>9.1f}"
    )
    lines += [f"{'+ ' + name:<{width}} {nbytes / MB:>9.1f}" for name, nbytes in estimate.outside_allocator]
    percent = 100 * estimate.estimated_peak_mb / budget_mb
    verdict = "fits" if estimate.fits(budget_mb) else "DOES NOT FIT"
    lines.append(f"{'= estimated peak on the card':<{width}} {estimate.estimated_peak_mb:>9.1f}")
    lines.append(
        f"Budget {budget_mb:.0f} MB: {percent:.1f}% used, {verdict}. "
        "(Reference run, GTX 1050 Ti: 3087.4 MB max allocated, 3228.0 MB reserved.)"
    )
    lines += [f"Note: {note}" for note in estimate.notes]
    return "\n".join(lines)


# --------------------------------------------------------------------------- configurations
def _section(config: Mapping[str, Any], name: str) -> dict[str, Any]:
    section = config.get(name) or {}
    if not isinstance(section, Mapping):
        raise Phi2TutorError(f"The config's {name!r} section is not a mapping.")
    if "init_args" in section:
        return dict(section.get("init_args") or {})
    return {k: v for k, v in section.items() if k != "class_path"}


def plan_from_config_dict(
    config: Mapping[str, Any],
    source: str = "the config",
    loss_token_fraction: float = 1.0,
    loss_chunk_tokens: int | None = None,
) -> MemoryEstimate:
    """Estimate of TutorModule's and MathDataModule's hyperparameters and the Trainer's settings, given as
    the ``model``, ``data`` and ``trainer`` sections of a LightningCLI config (fields left out take the
    classes' defaults; ``phi2tutor plan`` passes what LightningCLI parsed).

    ``loss_token_fraction`` is the share of positions that get logits (1.0: every position is an answer
    token, the worst case); ``loss_chunk_tokens`` caps them when the loss is chunked.
    """
    model = _section(config, "model")
    data = _section(config, "data")
    trainer = _section(config, "trainer")
    model_name_or_path = model.get("model_name_or_path") or PHI2_HUB_ID
    shape_config = load_model_config(model_name_or_path, model.get("model_config"))
    compute_dtype = model.get("compute_dtype", "float32")
    precision = str(trainer.get("precision", "32-true"))
    attention = model.get("attn_implementation")
    if attention is None:
        # TutorModule's rule: the fp16-safe attention whenever fp16 is involved, else sdpa.
        fp16 = compute_dtype == "float16" or precision.startswith("16")
        attention = FP32_SCORES_ATTENTION if fp16 else "sdpa"
    if attention not in ATTENTIONS:
        attention = "eager"  # other implementations (flash) keep no more than eager does
    label = "model.model_config" if model.get("model_config") is not None else model_name_or_path
    try:
        return estimate_memory(
            shape_config,
            quantization=model.get("quantization", "none"),
            compute_dtype=compute_dtype,
            precision=precision,
            lora_r=int(model.get("lora_r", 8)),
            lora_target_modules=tuple(model.get("lora_target_modules") or PHI2_LORA_TARGETS),
            lora_dropout=float(model.get("lora_dropout", 0.05)),
            modules_to_save=tuple(model.get("modules_to_save") or ()),
            optimizer=model.get("optimizer", "adamw"),
            micro_batch=_micro_batch(data.get("batch_size", 4)),  # MathDataModule's default
            max_length=int(data.get("max_length", 512)),
            gradient_checkpointing=bool(model.get("gradient_checkpointing", False)),
            embeddings_on_cpu=bool(model.get("embeddings_on_cpu", False)),
            offload_checkpoints=bool(model.get("offload_checkpoints", False)),
            accumulate_grad_batches=int(trainer.get("accumulate_grad_batches") or 1),
            attention=attention,
            loss_token_fraction=loss_token_fraction,
            loss_chunk_tokens=loss_chunk_tokens,
            model_name=str(label),
        )
    except ValueError as error:
        raise Phi2TutorError(f"{source}: {error}.") from None


def _micro_batch(batch_size: Any) -> int:
    if batch_size == AUTO_BATCH:
        raise ValueError(
            "data.batch_size is auto: plan a number (choose_micro_batch picks it from an estimate at any size)"
        )
    return int(batch_size)


def plan_from_hparams(
    model_hparams: Mapping[str, Any],
    data_hparams: Mapping[str, Any] | None = None,
    precision: str = "32-true",
    accumulate_grad_batches: int = 1,
    loss_token_fraction: float = 1.0,
    source: str = "the running configuration",
) -> MemoryEstimate:
    """Estimate of a configuration: TutorModule's and MathDataModule's hparams, the Trainer's precision
    and accumulation. The one plan: TutorModule prints it when fit starts, GPUMemoryProfiler reuses it,
    ``phi2tutor plan`` prints it from the same parsed config."""
    config = {
        "model": dict(model_hparams),
        "data": dict(data_hparams or {}),
        "trainer": {"precision": str(precision), "accumulate_grad_batches": accumulate_grad_batches},
    }
    return plan_from_config_dict(config, source=source, loss_token_fraction=loss_token_fraction)
