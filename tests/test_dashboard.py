"""TensorBoardDashboard: the custom-scalars layout, loss-chart markers and HParams rows, read back from the
event files with tensorboard's own reader."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.hparams import plugin_data_pb2

from callbacks.dashboard import TensorBoardDashboard
from callbacks.phases import PhaseDetection
from callbacks.plateau import PlateauStopping
from phi2tutor.cli import main
from phi2tutor.events import read_scalars
from phi2tutor.keys import HPARAM_METRIC_KEYS, LOSS_EPOCH_KEY, PHASE_TRANSITION_MARKER, PLATEAU_STOP_MARKER
from tests.conftest import tiny_config, write_yaml
from tests.reference_run import reference_loss_series
from tests.test_phase_callbacks import as_logged

# The reference run's curve (a fast fall, a knee, then slow): per-epoch values of train/loss_epoch.
SCRIPTED = as_logged(reference_loss_series())


def _accumulator(run_dir: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(run_dir), size_guidance={"tensors": 0, "scalars": 0})
    accumulator.Reload()
    return accumulator


def read_layout(run_dir: Path) -> layout_pb2.Layout:
    accumulator = _accumulator(run_dir)
    (event,) = accumulator.Tensors("custom_scalars__config__")
    return layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])


def read_hparams(run_dir: Path) -> dict[str, object]:
    content = _accumulator(run_dir).PluginTagToContent("hparams")["_hparams_/session_start_info"]
    values = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    return {
        key: value.WhichOneof("kind") and getattr(value, value.WhichOneof("kind"))
        for key, value in values.items()
    }


class ScriptedLoss(pl.LightningModule):
    """Logs SCRIPTED[epoch] as the epoch loss, whatever the weights do."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        value = SCRIPTED[self.current_epoch]
        self.log(LOSS_EPOCH_KEY, value, on_step=False, on_epoch=True)
        return (self.weight * batch[0]).sum() * 0 + value

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(2, 1)), batch_size=2)


def test_markers_sit_on_the_epoch_loss_at_each_transition_and_at_the_plateau_stop(tmp_path: Path) -> None:
    detector = PhaseDetection(monitor=LOSS_EPOCH_KEY)
    plateau = PlateauStopping(monitor=LOSS_EPOCH_KEY, window=10, min_rel_improvement=0.01)
    trainer = pl.Trainer(
        max_epochs=len(SCRIPTED),
        logger=TensorBoardLogger(tmp_path, name="runs", default_hp_metric=False),
        callbacks=[TensorBoardDashboard(), detector, plateau],  # dashboard first: it must still see them
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=1,
    )
    trainer.fit(ScriptedLoss())
    run_dir = Path(trainer.log_dir)
    scalars = read_scalars(run_dir)
    epoch_loss = scalars[LOSS_EPOCH_KEY]  # (step, value), one per epoch, epoch 1 first
    assert detector.transitions, "a curve with a sharp knee has at least one phase transition"
    expected = [epoch_loss[t.boundary - 1] for t in detector.transitions]
    assert [(s, round(v, 6)) for s, v in scalars[PHASE_TRANSITION_MARKER]] == [
        (s, round(v, 6)) for s, v in expected
    ]
    assert plateau.stopped_at_epoch is not None and plateau.stopped_at_epoch < len(SCRIPTED)
    assert scalars[PLATEAU_STOP_MARKER] == [epoch_loss[plateau.stopped_at_epoch - 1]]
    layout = read_layout(run_dir)
    assert [category.title for category in layout.category] == [
        "1 loss",
        "2 answer accuracy",
        "3 learning rate and grad norm",
        "4 memory",
    ]
    loss_chart = layout.category[0].chart[0].multiline.tag
    assert "^train/loss_epoch$" in loss_chart and "^markers/phase_transition$" in loss_chart
    hparam_metrics = read_scalars(run_dir)
    assert hparam_metrics[HPARAM_METRIC_KEYS["epochs_run"]][-1][1] == plateau.stopped_at_epoch
    assert hparam_metrics[HPARAM_METRIC_KEYS["final_train_loss"]][-1][1] == epoch_loss[-1][1]


def test_a_sweep_of_two_runs_gives_two_hparams_rows_with_final_metrics(tmp_path: Path) -> None:
    run_dirs = []
    for index, rank in enumerate((4, 8)):
        config = tiny_config(
            tmp_path,
            trainer={"max_epochs": 2, "limit_train_batches": 2, "limit_val_batches": 1},
            model={**tiny_config(tmp_path)["model"], "lora_r": rank},
        )
        main(["fit", "--config", str(write_yaml(tmp_path / f"r{rank}.yaml", config))])
        run_dirs.append(tmp_path / "lightning_logs" / f"version_{index}")
    rows = [read_hparams(run_dir) for run_dir in run_dirs]
    assert [row["lora_r"] for row in rows] == [4, 8]
    assert all(row["batch_size"] == 8 and row["accumulate_grad_batches"] == 1 for row in rows)
    assert rows[0]["quantization"] == "none" and rows[0]["learning_rate"] == 0.003
    for run_dir in run_dirs:
        scalars = read_scalars(run_dir)
        val_losses = [v for _, v in scalars["val/loss"]]
        assert scalars[HPARAM_METRIC_KEYS["best_val_loss"]][-1][1] == min(val_losses)
        assert scalars[HPARAM_METRIC_KEYS["last_val_loss"]][-1][1] == val_losses[-1]
        assert scalars[HPARAM_METRIC_KEYS["epochs_run"]][-1][1] == 2
        assert [c.title for c in read_layout(run_dir).category][0] == "1 loss"
