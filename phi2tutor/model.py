"""TutorModule: Phi-2 (or a small model of its class) with optional bitsandbytes quantization and
peft LoRA, its training and validation steps, optimizer and warmup + cosine schedule, and batched
greedy generation for answer evaluation.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info

from phi2tutor.errors import Phi2TutorError, check_option
from phi2tutor.keys import (
    ADAPTER_DIR,
    GRAD_NORM_KEY,
    LOSS_EPOCH_KEY,
    LOSS_STEP_KEY,
    LR_KEY,
    TEST_LOSS_KEY,
    VAL_LOSS_KEY,
)
from phi2tutor.phi2 import PHI2_HUB_ID, PHI2_LORA_TARGETS
from phi2tutor.prompts import PHI2_QA_TEMPLATE, format_prompt

if TYPE_CHECKING:
    from phi2tutor.calculator_decoding import CalculatorCounts

Quantization = Literal["none", "nf4", "nf4-double", "int8"]
ComputeDtype = Literal["float32", "float16", "bfloat16"]
OptimizerName = Literal["adamw", "adamw8bit", "paged_adamw8bit"]


def warmup_cosine_schedule(
    optimizer: torch.optim.Optimizer, warmup_steps: int, schedule_steps: int, min_lr_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """transformers' linear warmup + cosine down to ``min_lr_ratio`` of the peak over ``schedule_steps``
    optimizer steps, then held at that floor (past num_training_steps transformers' cosine would rise
    again; ``lr_schedule_epochs`` shorter than the run needs the floor). The factor function is a
    ``phi2tutor.schedule.ShortenableSchedule``: PhaseAwareLR can shorten it, and the shortening is part of
    the scheduler's checkpoint state."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    from phi2tutor.schedule import ShortenableSchedule

    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, warmup_steps, schedule_steps, min_lr_rate=min_lr_ratio
    )
    scheduler.lr_lambdas = [
        ShortenableSchedule(cosine, schedule_steps, min_lr_ratio) for cosine in scheduler.lr_lambdas
    ]
    return scheduler


class TutorModule(LightningModule):
    def __init__(
        self,
        model_name_or_path: str = PHI2_HUB_ID,
        model_config: dict[str, Any] | None = None,
        tokenizer_name_or_path: str | None = None,
        adapter_path: str | None = None,
        trust_remote_code: bool = False,
        quantization: Quantization = "none",
        compute_dtype: ComputeDtype = "float32",
        attn_implementation: str | None = None,
        lora_r: int = 8,
        lora_alpha: int = 16,
        lora_dropout: float = 0.05,
        lora_target_modules: list[str] | None = None,
        modules_to_save: list[str] | None = None,
        gradient_checkpointing: bool = False,
        embeddings_on_cpu: bool = False,
        offload_checkpoints: bool = False,
        optimizer: OptimizerName = "adamw",
        learning_rate: float = 1e-4,
        weight_decay: float = 0.0,
        warmup_fraction: float = 0.12,
        warmup_steps: int | None = None,
        min_lr_ratio: float = 0.0,
        lr_schedule_epochs: float | None = None,
        prompt_template: str = PHI2_QA_TEMPLATE,
        max_new_tokens: int = 256,
        adapter_output_dir: str | None = None,
        init_seed: int = 0,
        calculator: bool | None = None,
        annotated_training_data: bool = False,
    ) -> None:
        """LoRA-adapted Phi-2 for math tutoring.

        Args:
            model_name_or_path: Hub id or local directory of the base model (weights and tokenizer).
                Ignored for weights when ``model_config`` is given.
            model_config: PhiConfig keyword arguments: build a small randomly initialised model of
                Phi-2's class instead of loading weights (tests; seeded by ``init_seed``).
            tokenizer_name_or_path: Tokenizer hub id or directory; default ``model_name_or_path``
                (the bundled tokenizer when ``model_config`` is given).
            adapter_path: A saved LoRA adapter (peft ``save_pretrained`` directory) to load instead of
                creating a fresh one; for validate/test/predict on a finished run.
            trust_remote_code: Allow custom modelling code from the hub. Off: Phi-2 is native to transformers.
            quantization: Base weight quantization through bitsandbytes: ``none``, ``nf4`` (4-bit),
                ``nf4-double`` (4-bit with double quantization, the QLoRA setting) or ``int8``.
            compute_dtype: Dtype of the frozen base weights and of 4-bit matmuls. ``float16`` for
                cards without bf16 (GTX 10xx); pair it with ``trainer.precision: 16-mixed``.
            attn_implementation: transformers attention implementation (``eager``, ``sdpa``, ...).
                Default: the fp16-safe fp32-score attention when training in float16, else ``sdpa``.
            lora_r: LoRA rank.
            lora_alpha: LoRA scaling numerator (scale = alpha / r).
            lora_dropout: Dropout on the LoRA input.
            lora_target_modules: Modules that get LoRA; default Phi-2's six linear layers
                ``q_proj k_proj v_proj dense fc1 fc2``.
            modules_to_save: Modules trained in full next to LoRA (e.g. ``embed_tokens``, ``lm_head``
                for a small base that must learn new token uses).
            gradient_checkpointing: Recompute activations in the backward pass (less memory, ~30% slower).
            embeddings_on_cpu: Keep the frozen embedding table (embed_tokens) in CPU memory and look up
                the batch's rows there; only those rows go to the GPU (Phi-2: 250 MB less GPU memory).
            offload_checkpoints: Keep the checkpointed decoder-layer inputs in pinned CPU memory between
                the forward and the backward (torch.autograd.graph.save_on_cpu); needs
                ``gradient_checkpointing`` (Phi-2 at 512 tokens: ~160 MB less, one host round trip per layer).
            optimizer: ``adamw`` (torch, fp32 states), ``adamw8bit`` or ``paged_adamw8bit`` (bitsandbytes).
            learning_rate: Peak learning rate, reached at the end of warmup.
            weight_decay: AdamW weight decay.
            warmup_fraction: Share of all optimizer steps spent in linear warmup (reference run: ~0.12).
            warmup_steps: Warmup length in optimizer steps; overrides ``warmup_fraction`` when set.
            min_lr_ratio: Floor of the cosine decay as a fraction of the peak learning rate.
            lr_schedule_epochs: Epochs over which warmup + cosine run, after which the rate stays at
                the floor; default the whole run (``trainer.max_epochs``). Set it when max_epochs is
                a budget cap that PlateauStopping is expected to cut short.
            prompt_template: Prompt with a ``{question}`` field; must match the data module's (the CLI links them).
            max_new_tokens: Default generation length of ``generate``.
            adapter_output_dir: Extra directory that receives the adapter and tokenizer when fit ends
                (e.g. ``models/phi2-matematicas-tutor``); the run directory always gets one.
            init_seed: Seed of the random initialisation of a ``model_config`` model.
            calculator: Decode with the calculator: after ``<<expr=`` the result and ``>>`` are forced
                (GSM8K's annotations; phi2tutor.calculator). Default: on when the tutor was trained with
                annotations, as recorded in ``adapter_path``'s phi2tutor_adapter.json, else as
                ``annotated_training_data`` says.
            annotated_training_data: The training data carries calculator annotations (the CLI links it to
                data.keep_calculator_annotations and the generator's calculator_annotations).
        """
        super().__init__()
        for name, value, valid, requirement in (
            ("lora_r", lora_r, lora_r >= 1, "a positive integer (the LoRA rank, e.g. 8 or 16)"),
            ("lora_alpha", lora_alpha, lora_alpha > 0, "positive (the scale is lora_alpha / lora_r)"),
            ("lora_dropout", lora_dropout, 0 <= lora_dropout < 1, "in [0, 1)"),
            ("learning_rate", learning_rate, learning_rate > 0, "positive"),
            ("weight_decay", weight_decay, weight_decay >= 0, "0 or more"),
            ("warmup_fraction", warmup_fraction, 0 <= warmup_fraction <= 1, "in [0, 1]"),
            ("warmup_steps", warmup_steps, warmup_steps is None or warmup_steps >= 0, "0 or more, or null"),
            ("min_lr_ratio", min_lr_ratio, 0 <= min_lr_ratio <= 1, "in [0, 1]"),
            (
                "lr_schedule_epochs",
                lr_schedule_epochs,
                lr_schedule_epochs is None or lr_schedule_epochs > 0,
                "positive, or null (the whole run)",
            ),
            ("max_new_tokens", max_new_tokens, max_new_tokens >= 1, "a positive integer"),
        ):
            check_option("model", name, value, valid, requirement)
        if model_config is not None and model_name_or_path != PHI2_HUB_ID:
            raise Phi2TutorError(
                f"model.model_config builds a randomly initialised PhiForCausalLM, so "
                f"model.model_name_or_path={model_name_or_path!r} would not be loaded: give one of the two "
                "(model_config: null to train that model)."
            )
        if offload_checkpoints and not gradient_checkpointing:
            raise Phi2TutorError(
                "model.offload_checkpoints keeps the checkpointed layer inputs in CPU memory: it needs "
                "model.gradient_checkpointing: true (without checkpointing there are no such inputs to move)."
            )
        if embeddings_on_cpu and "embed_tokens" in (modules_to_save or []):
            raise Phi2TutorError(
                "model.embeddings_on_cpu keeps a frozen embedding table in CPU memory, but "
                "model.modules_to_save trains embed_tokens: drop one of the two."
            )
        self.save_hyperparameters()
        self.lora_target_modules = list(lora_target_modules or PHI2_LORA_TARGETS)
        self.model: torch.nn.Module | None = None
        self.tokenizer = None
        self.attention_implementation: str | None = None
        self.memory_estimate = None  # set when a Trainer runs: the planner's estimate for this config
        # What the calculator did in the latest generate() call (None: it was off).
        self.last_calculator_counts: CalculatorCounts | None = None
        self._equals_token_ids: frozenset[int] | None = None
        # train/loss_epoch, the epoch mean PhaseDetection and PlateauStopping follow. A torchmetrics mean (synced
        # over processes) whose state travels in checkpoints: Lightning 2 does not save its own epoch
        # accumulators, so after a mid-epoch resume its mean would cover only the resumed part of the epoch.
        from torchmetrics import MeanMetric

        self.train_epoch_loss = MeanMetric()
        self.train_epoch_loss.persistent(True)
        self._epoch_loss_epoch: int | None = None  # the epoch whose micro-batches train_epoch_loss holds
        self._lr_schedule: dict[str, int] | None = None  # warmup and schedule steps, saved in checkpoints
        self._checkpoint_lr_schedule: dict[str, int] | None = None  # the resumed checkpoint's
        # Checkpoints hold only trainable weights: the frozen base is loaded from its source.
        self.strict_loading = False

    # ------------------------------------------------------------------ loading
    @property
    def uses_float16(self) -> bool:
        precision = str(getattr(self._trainer, "precision", "")) if self._trainer is not None else ""
        return self.hparams.compute_dtype == "float16" or precision.startswith("16")

    def prepare_data(self) -> None:
        """Download a hub base model (and tokenizer) once per node, before any process loads it: under DDP
        every process would otherwise download the same 5 GB."""
        from phi2tutor.loading import download_from_hub, tokenizer_source

        hp = self.hparams
        if hp.model_config is None:
            download_from_hub(hp.model_name_or_path, "base model", "model.model_name_or_path")
        source = tokenizer_source(hp.tokenizer_name_or_path, hp.model_name_or_path, hp.model_config)
        if source != hp.model_name_or_path:
            download_from_hub(source, "tokenizer", "model.tokenizer_name_or_path")

    def configure_model(self) -> None:
        """Load tokenizer, base model, quantization and LoRA (once; Lightning calls it for every stage)."""
        if self.model is not None:
            return
        from phi2tutor.loading import load_base_model, load_tokenizer, wrap_with_lora

        hp = self.hparams
        self.tokenizer = load_tokenizer(hp.tokenizer_name_or_path, hp.model_name_or_path, hp.model_config)
        from phi2tutor.attention import FP32_SCORES_ATTENTION, register_fp32_scores_attention

        attn = hp.attn_implementation
        if attn is None:
            attn = FP32_SCORES_ATTENTION if self.uses_float16 else "sdpa"
        if attn == FP32_SCORES_ATTENTION:
            register_fp32_scores_attention()
        self.attention_implementation = attn
        base = load_base_model(
            model_name_or_path=hp.model_name_or_path,
            model_config=hp.model_config,
            quantization=hp.quantization,
            compute_dtype=hp.compute_dtype,
            attn_implementation=attn,
            trust_remote_code=hp.trust_remote_code,
            init_seed=hp.init_seed,
        )
        if hp.embeddings_on_cpu:
            from phi2tutor.offload import keep_embeddings_on_host

            keep_embeddings_on_host(base)
        for module in base.modules():
            # bitsandbytes 0.50 repacks 4-bit weights for AVX512-BF16 CPUs at the first eval forward (e.g.
            # validation), after which a training forward fails in place on the bias; keep the training layout.
            if getattr(module, "support_avx512bf16_for_cpu", False):
                module.support_avx512bf16_for_cpu = False
        if hp.gradient_checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            base.config.use_cache = False
            # LoRA-only training leaves the embedding output without grad; checkpointed blocks need it.
            base.enable_input_require_grads()
        self.model = wrap_with_lora(
            base,
            adapter_path=hp.adapter_path,
            r=hp.lora_r,
            alpha=hp.lora_alpha,
            dropout=hp.lora_dropout,
            target_modules=self.lora_target_modules,
            modules_to_save=hp.modules_to_save,
        )
        # from_pretrained returns the model in eval mode and Lightning (2.2+) keeps submodules' modes: in
        # eval mode transformers skips gradient checkpointing and every dropout is off.
        self.model.train()
        self._print_summary()

    def _print_summary(self) -> None:
        # peft counts a bitsandbytes 4-bit element as the two weights it packs.
        trainable, total = self.model.get_nb_trainable_parameters()
        precision = getattr(self._trainer, "precision", "n/a") if self._trainer is not None else "n/a"
        rank_zero_info(
            f"phi2tutor | model {self.model_source} | parameters {total / 1e6:,.2f}M total, "
            f"{trainable / 1e6:,.3f}M trainable ({100 * trainable / max(total, 1):.2f}%) | "
            f"quantization {self.hparams.quantization} | compute dtype {self.hparams.compute_dtype} | "
            f"precision {precision} | attention {self.attention_implementation}"
        )
        trainer = self._trainer
        micro_batch = getattr(getattr(trainer, "datamodule", None), "hparams", {}).get("batch_size")
        if trainer is None or not micro_batch:
            return
        accumulation, devices, nodes = trainer.accumulate_grad_batches, trainer.num_devices, trainer.num_nodes
        rank_zero_info(
            f"phi2tutor | effective batch {micro_batch * accumulation * devices * nodes} = micro-batch "
            f"{micro_batch} x accumulation {accumulation} x devices {devices} x nodes {nodes}"
        )
        self._print_memory_estimate(trainer)

    def _print_memory_estimate(self, trainer) -> None:
        """The planner's peak GPU memory for this configuration (GPUMemoryProfiler reuses it)."""
        from phi2tutor.memory import plan_from_hparams

        try:
            self.memory_estimate = plan_from_hparams(
                self.hparams,
                trainer.datamodule.hparams,
                str(trainer.precision),
                trainer.accumulate_grad_batches,
            )
        except Exception as error:  # an estimate must never stop a run
            rank_zero_info(f"phi2tutor | no memory estimate: {error}")
            return
        estimate = self.memory_estimate
        rank_zero_info(
            f"phi2tutor | estimated peak GPU memory {estimate.estimated_peak_mb:,.0f} MB "
            f"({estimate.estimated_peak_allocated_mb:,.0f} MB allocated by torch) for this configuration on "
            "a CUDA device; `phi2tutor plan --config ...` shows the breakdown"
        )

    @property
    def model_source(self) -> str:
        if self.hparams.model_config is not None:
            return "PhiForCausalLM built from model_config"
        return self.hparams.model_name_or_path

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ steps
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs) -> Any:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def target_token_loss(self, batch: dict[str, torch.Tensor], reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy over answer tokens (``mean`` or ``sum``), with the LM head applied to those
        positions only.

        The full-vocabulary logits of every position (fp32 for the loss) are the largest buffer of a
        Phi-2 step at seq 512; the prompt and padding positions never need them.
        """
        base = self.model.get_base_model()
        with self._checkpoint_offload():
            hidden = base.model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                position_ids=batch.get("position_ids"),
                use_cache=False,
            ).last_hidden_state
        targets = batch["labels"][:, 1:]
        is_target = targets != -100
        logits = base.lm_head(hidden[:, :-1][is_target])
        return F.cross_entropy(logits.float(), targets[is_target], reduction=reduction)

    def _checkpoint_offload(self):
        """The block in which saved tensors wait in CPU memory (``offload_checkpoints``), else a no-op."""
        from phi2tutor import offload

        if self.hparams.offload_checkpoints and torch.is_grad_enabled():
            return offload.saved_tensors_on_host(self.device)
        return contextlib.nullcontext()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        """The micro-batch's share of its optimizer step's token-mean loss.

        An optimizer step's loss is the sum of the token losses of all its micro-batches (on all
        processes) over their total target tokens, as one large batch would have it, so every answer
        token weighs the same whatever the micro-batch, accumulation and process count (transformers'
        Trainer does the same with num_items_in_batch). The sampler tags each batch with that total
        (``step_target_tokens``, counting only the micro-batches the step trains) and with the number of
        processes it covers (``step_processes``). No all-reduce is needed: every process's sampler holds
        the one global order, so each knows the whole step's total before the step starts. Lightning
        divides the returned loss by accumulate_grad_batches (also for an epoch's shorter last step) and
        DDP averages gradients over processes: both are multiplied back here. The logged train/loss stays
        this micro-batch's own per-token mean.
        """
        loss_sum = self.target_token_loss(batch, reduction="sum")
        tokens = (batch["labels"][:, 1:] != -100).sum()
        token_mean = loss_sum / tokens
        step_tokens = batch.get("step_target_tokens")
        if step_tokens is None:  # a loader without the tag: each micro-batch weighs the same
            objective = token_mean
        else:
            # The processes the count covers: all of them, or (use_distributed_sampler=False, every
            # process ordering all the data itself) this one, whose gradient DDP then averages with its
            # equals. Tensors on the device: no host sync per micro-batch.
            processes = batch["step_processes"]
            objective = loss_sum * (self.trainer.accumulate_grad_batches * processes) / step_tokens
        batch_size = batch["input_ids"].shape[0]
        self.log(
            LOSS_STEP_KEY, token_mean, on_step=True, on_epoch=False, prog_bar=True, batch_size=batch_size
        )
        if self._epoch_loss_epoch != self.current_epoch:  # a new epoch (or a checkpoint's finished one)
            self.train_epoch_loss.reset()
            self._epoch_loss_epoch = self.current_epoch
        # Weighted by the micro-batch's examples, as Lightning's own epoch mean of a logged tensor is.
        self.train_epoch_loss.update(token_mean.detach(), weight=batch_size)
        self.log(LOSS_EPOCH_KEY, self.train_epoch_loss, on_step=False, on_epoch=True)
        return {"loss": objective, "token_mean_loss": token_mean.detach()}

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.target_token_loss(batch)
        self.log(VAL_LOSS_KEY, loss, prog_bar=True, sync_dist=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.target_token_loss(batch)
        self.log(TEST_LOSS_KEY, loss, sync_dist=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, str]]:
        generations = self.generate(batch["question"])
        return [{"question": q, "generation": g} for q, g in zip(batch["question"], generations)]

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Lightning unscales 16-mixed gradients before this hook and clips after it: this is the
        # true total norm before clipping.
        # Not lightning.pytorch.utilities.grad_norm: it builds a dict of per-parameter norms and copies each
        # to the host to total them; this is the one total, on the device.
        grads = [p.grad for p in self.trainable_parameters() if p.grad is not None]
        if not grads:
            return
        grad_norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
        if torch.isfinite(grad_norm):  # an fp16 overflow step is skipped by the scaler; don't plot inf
            self.log(GRAD_NORM_KEY, grad_norm, on_step=True, on_epoch=False)

    # ------------------------------------------------------------------ optimizer
    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        params = self.trainable_parameters()
        if hp.optimizer == "adamw":
            optimizer = torch.optim.AdamW(params, lr=hp.learning_rate, weight_decay=hp.weight_decay)
        else:
            import bitsandbytes as bnb

            cls = bnb.optim.PagedAdamW8bit if hp.optimizer == "paged_adamw8bit" else bnb.optim.AdamW8bit
            optimizer = cls(params, lr=hp.learning_rate, weight_decay=hp.weight_decay)
        warmup, total_steps = self._lr_schedule_length()
        scheduler = warmup_cosine_schedule(optimizer, warmup, total_steps, hp.min_lr_ratio)
        # The name is the TensorBoard key LearningRateMonitor logs under.
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": LR_KEY},
        }

    def _lr_schedule_length(self) -> tuple[int, int]:
        """(warmup, warmup + cosine) optimizer steps: from this run's options, or the checkpoint's when resuming.

        A resumed run may have another max_epochs (a longer budget), which would stretch a schedule that
        spans the whole run and make the rate jump at the resumed step: it keeps the schedule it started with.
        """
        hp = self.hparams
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        max_epochs = self.trainer.max_epochs
        if hp.lr_schedule_epochs is not None and max_epochs and max_epochs > 0:
            total_steps = max(1, round(total_steps * min(1.0, hp.lr_schedule_epochs / max_epochs)))
        warmup = hp.warmup_steps if hp.warmup_steps is not None else round(hp.warmup_fraction * total_steps)
        saved = self._checkpoint_lr_schedule
        if saved is not None and (saved["warmup_steps"], saved["schedule_steps"]) != (warmup, total_steps):
            rank_zero_info(
                f"phi2tutor | learning-rate schedule kept from the checkpoint: warmup {saved['warmup_steps']} + "
                f"cosine to {saved['schedule_steps']} optimizer steps (this run's options would make it "
                f"{warmup} + {total_steps}; a new run without --ckpt_path takes them)"
            )
            warmup, total_steps = int(saved["warmup_steps"]), int(saved["schedule_steps"])
        self._lr_schedule = {"warmup_steps": warmup, "schedule_steps": total_steps}
        return warmup, total_steps

    # ------------------------------------------------------------------ checkpoints and adapters
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # What was logged up to this checkpoint reaches the event file now: after a crash the resumed run
        # continues from here (TensorBoard's writer would otherwise hold up to two minutes of events).
        for logger in self.trainer.loggers:
            logger.save()
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {
            k: v
            for k, v in checkpoint["state_dict"].items()
            if k in trainable or k.startswith("train_epoch_loss.")
        }
        checkpoint["train_epoch_loss_epoch"] = self._epoch_loss_epoch
        if self._lr_schedule is not None:
            checkpoint["lr_schedule"] = dict(self._lr_schedule)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The epoch the saved epoch-loss state belongs to: continued when the resume is inside that epoch.
        self._epoch_loss_epoch = checkpoint.get("train_epoch_loss_epoch")
        self._checkpoint_lr_schedule = checkpoint.get("lr_schedule")
        expected = {name for name, p in self.named_parameters() if p.requires_grad}
        missing = expected - set(checkpoint["state_dict"])
        if missing:
            raise Phi2TutorError(
                f"The checkpoint lacks {len(missing)} trainable weights of this model (e.g. "
                f"{sorted(missing)[0]}). It was written by a run with other LoRA settings (r, target "
                "modules, modules_to_save): use the same model section of the config as that run."
            )

    def on_train_end(self) -> None:
        # On every process: under DDP trainer.log_dir is a collective (a broadcast from rank 0).
        directories = self.adapter_directories()
        if self.trainer.is_global_zero:
            for directory in directories:
                self.save_adapter(directory)
            if not directories:
                rank_zero_info(
                    "phi2tutor | no logger (no run directory) and no model.adapter_output_dir: the adapter is "
                    "not saved as a directory; the trained weights are only in the checkpoints"
                )

    def adapter_directories(self) -> list[Path]:
        directories = []
        # Without a logger, log_dir falls back to the working directory: no run directory, no copy.
        if self.trainer.logger is not None and self.trainer.log_dir is not None:
            directories.append(Path(self.trainer.log_dir) / ADAPTER_DIR)
        if self.hparams.adapter_output_dir:
            directories.append(Path(self.hparams.adapter_output_dir))
        return directories

    def save_adapter(self, directory: str | os.PathLike) -> Path:
        """Save the LoRA adapter (safetensors) and the tokenizer with peft/transformers' own writers, and
        phi2tutor_adapter.json: how this tutor decodes (the calculator) and what it was trained on."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(directory, safe_serialization=True)
        self.tokenizer.save_pretrained(directory)
        # What chat, serve and export need to rebuild this tutor from the directory alone, with the
        # calculator setting resolved (None means "as the data says": written down as what it decided).
        from phi2tutor.tutor import write_tutor_settings

        settings = dict(self.hparams)
        settings["calculator"] = self.calculator_enabled
        settings["annotated_training_data"] = self.trained_with_annotations
        write_tutor_settings(directory, settings)
        rank_zero_info(f"phi2tutor | adapter and tokenizer saved to {directory}")
        return directory

    # ------------------------------------------------------------------ calculator
    def adapter_record(self) -> dict[str, Any]:
        """phi2tutor_adapter.json of ``adapter_path`` ({} without an adapter or without that file)."""
        from phi2tutor.tutor import read_tutor_settings

        if not self.hparams.adapter_path:
            return {}
        return read_tutor_settings(self.hparams.adapter_path) or {}

    @property
    def trained_with_annotations(self) -> bool:
        """Whether this tutor's training data carried calculator annotations (this run's data, or the
        loaded adapter's record)."""
        record = self.adapter_record()
        return bool(self.hparams.annotated_training_data or record.get("annotated_training_data"))

    @property
    def calculator_enabled(self) -> bool:
        """model.calculator when set; else the loaded adapter's record; else whether the data is annotated."""
        if self.hparams.calculator is not None:
            return bool(self.hparams.calculator)
        recorded = self.adapter_record().get("calculator")
        if recorded is not None:
            return bool(recorded)
        return bool(self.hparams.annotated_training_data)

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(
        self,
        questions: list[str],
        max_new_tokens: int | None = None,
        batch_size: int = 16,
        calculator: bool | None = None,
        **generate_kwargs: Any,
    ) -> list[str]:
        """Greedy answers to ``questions``: batched, left-padded, KV-cached, stopped at EOS.

        With the calculator (``calculator``; default ``calculator_enabled``) every ``<<expr=`` a row writes
        is completed by phi2tutor.calculator; what it did is in ``last_calculator_counts``.
        Returns only the new text of each answer, in the order of ``questions``. ``generate_kwargs`` go to
        transformers' ``generate`` (sampling, a streamer, stopping criteria: chat and serve use them);
        batches run in order of prompt length.
        """
        if self.model is None:
            self.configure_model()
        from transformers import LogitsProcessorList

        from phi2tutor.calculator_decoding import (
            CalculatorCounts,
            CalculatorLogitsProcessor,
            equals_token_ids,
        )

        max_new_tokens = max_new_tokens or self.hparams.max_new_tokens
        use_calculator = self.calculator_enabled if calculator is None else calculator
        counts = CalculatorCounts() if use_calculator else None
        if use_calculator and self._equals_token_ids is None:
            self._equals_token_ids = equals_token_ids(self.tokenizer)
        # The caller's processors apply to every batch; the calculator's is made per batch (its prompt width).
        given_processors = list(generate_kwargs.pop("logits_processor", None) or [])
        tokenizer = self.tokenizer
        prompts = [format_prompt(self.hparams.prompt_template, q) for q in questions]
        # Similar lengths in a batch waste less compute on padding.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        answers: list[str] = [""] * len(prompts)
        was_training = self.model.training
        self.model.eval()
        previous_side = tokenizer.padding_side
        tokenizer.padding_side = "left"
        try:
            for start in range(0, len(order), batch_size):
                indices = order[start : start + batch_size]
                encoded = tokenizer([prompts[i] for i in indices], return_tensors="pt", padding=True)
                encoded = {k: v.to(self.device) for k, v in encoded.items()}
                processors = LogitsProcessorList(given_processors)
                if counts is not None:
                    processor = CalculatorLogitsProcessor(
                        tokenizer, encoded["input_ids"].shape[1], self._equals_token_ids
                    )
                    processors.append(processor)
                options = {
                    "max_new_tokens": max_new_tokens,
                    "do_sample": False,
                    "use_cache": True,
                    "eos_token_id": tokenizer.eos_token_id,
                    "pad_token_id": tokenizer.pad_token_id,
                    **generate_kwargs,
                }
                output = self.model.generate(**encoded, logits_processor=processors, **options)
                new_tokens = output[:, encoded["input_ids"].shape[1] :]
                for i, text in zip(indices, tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
                    answers[i] = text.strip()
                if counts is not None:
                    counts.add(processor.counts)
        finally:
            tokenizer.padding_side = previous_side
            self.model.train(was_training)
        self.last_calculator_counts = counts
        return answers
