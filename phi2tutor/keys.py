"""TensorBoard keys and run-directory file names: written by the module and callbacks, read back by the
report and the benchmarks. One place, so a writer and its reader can never disagree (DESIGN.md: keep them
stable, the report reads them).
"""

# Scalars logged by TutorModule and LearningRateMonitor.
LOSS_STEP_KEY = "train/loss"
LOSS_EPOCH_KEY = "train/loss_epoch"
GRAD_NORM_KEY = "train/grad_norm"
LR_KEY = "train/lr"
VAL_LOSS_KEY = "val/loss"
TEST_LOSS_KEY = "test/loss"
EPOCH_KEY = "epoch"
TRUNCATED_KEY = "data/truncated_examples"

# MathAnswerEval.
ACCURACY_KEY = "val/answer_accuracy"
INVALID_RATE_KEY = "val/answer_invalid_rate"
EVAL_SECONDS_KEY = "val/answer_eval_seconds"
SAMPLES_KEY = "val/answer_samples"
CALCULATOR_CALLS_KEY = "val/calculator_calls"
CALCULATOR_CHANGED_KEY = "val/calculator_changed"

# PhaseDetection.
PHASE_INDEX_KEY = "phase/index"
TRANSITIONS_TEXT_TAG = "phase/transitions"

# PhaseAwareLR: what it did to the learning-rate schedule when rapid learning ended.
LR_SCHEDULE_TEXT_TAG = "phase/lr_schedule"

# GPUMemoryProfiler: MEMORY_PREFIX + allocated_mb, reserved_mb, max_allocated_mb, cpu_rss_mb, ...
MEMORY_PREFIX = "memory/"

# AutoMicroBatch's entry in a checkpoint's "callbacks" (phi2tutor.resume reads how auto resolved).
AUTO_MICRO_BATCH_STATE_KEY = "AutoMicroBatch"

# Files in a run directory (lightning_logs/version_N/).
REPORT_MD = "report.md"
REPORT_JSON = "report.json"
RUN_JSON = "run.json"
MEMORY_JSON = "memory.json"
CONFIG_YAML = "config.yaml"
TRAINER_STATE_JSON = "trainer_state.json"
ADAPTER_DIR = "adapter"
# Beside a saved adapter: the TutorModule settings chat, serve and export rebuild the tutor from.
TUTOR_SETTINGS_JSON = "phi2tutor_adapter.json"

# TensorBoardDashboard: markers drawn on the loss and learning-rate charts, the memory budget line, the HParams tab's metrics.
PHASE_TRANSITION_MARKER = "markers/phase_transition"
PLATEAU_STOP_MARKER = "markers/plateau_stop"
LR_SHORTENED_MARKER = "markers/lr_shortened"
MEMORY_BUDGET_KEY = "budget/memory_mb"
HPARAM_METRIC_KEYS = {
    "final_train_loss": "hparams/final_train_loss",
    "best_val_loss": "hparams/best_val_loss",
    "last_val_loss": "hparams/last_val_loss",
    "best_answer_accuracy": "hparams/best_answer_accuracy",
    "epochs_run": "hparams/epochs_run",
    "peak_memory_mb": "hparams/peak_memory_mb",
}
