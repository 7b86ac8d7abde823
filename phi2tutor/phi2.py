"""Facts about Phi-2 that several modules need (the model, the data module's tokenizer, the memory planner),
kept in one place. Pure: no torch import.
"""

PHI2_HUB_ID = "microsoft/phi-2"
"""The base model's hub id: TutorModule's default, and the tokenizer a data module falls back to."""

PHI2_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2")
"""Phi-2's linear layers in transformers' PhiForCausalLM: the default LoRA targets."""
