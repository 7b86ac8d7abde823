"""Resuming a fit: which checkpoint ``--ckpt_path last`` means, which run directory the resumed run
writes into (the one it continues), and which options may differ from the checkpoint's run.

Lightning's own ``last`` looks in the new run's version directory, which is empty, and LightningCLI
replaces the model options given beside ``--ckpt_path`` with the checkpoint's without a word; here both
are decided before the Trainer is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phi2tutor.errors import Phi2TutorError
from phi2tutor.keys import AUTO_MICRO_BATCH_STATE_KEY, CONFIG_YAML
from phi2tutor.memory.planner import AUTO_BATCH

LAST_CHECKPOINT_GLOB = "last*.ckpt"
# Options that do not change what is trained: they may differ on resume (the changes are printed), and
# the given value wins over the checkpoint's in every subcommand (validate, test, predict included).
RESUMABLE_MODEL_OPTIONS = {"adapter_output_dir", "max_new_tokens", "calculator"}
RESUMABLE_DATA_OPTIONS = {"num_workers", "eval_batch_size", "test_path", "predict_path"}
# Trainer options that change the optimization: a resumed run with other values is a different run.
# limit_train_batches sets the epoch's length: the lr schedule's length and a mid-epoch checkpoint's
# position in the epoch were computed from it.
FIXED_TRAINER_OPTIONS = {
    "accumulate_grad_batches",
    "limit_train_batches",
    "precision",
    "gradient_clip_val",
    "gradient_clip_algorithm",
}


@dataclass
class RunLocation:
    """Where a TensorBoardLogger run lives: ``save_dir/name/version``."""

    save_dir: Path
    name: str
    version: str

    @property
    def directory(self) -> Path:
        return self.save_dir / self.name / self.version


def find_last_checkpoint(search_dirs: list[Path]) -> Path | None:
    """The newest ``last*.ckpt`` (by modification time) in any of ``search_dirs``."""
    candidates = [path for directory in search_dirs for path in directory.glob(LAST_CHECKPOINT_GLOB)]
    return max(candidates, key=lambda path: path.stat().st_mtime) if candidates else None


def run_location(checkpoint: Path) -> RunLocation | None:
    """The run a checkpoint belongs to, when it lies in ``save_dir/name/version_N/checkpoints/``."""
    checkpoint = checkpoint.resolve()
    directory = checkpoint.parent
    if directory.name != "checkpoints" or len(directory.parents) < 3:
        return None
    version_dir = directory.parent
    return RunLocation(
        save_dir=version_dir.parent.parent, name=version_dir.parent.name, version=version_dir.name
    )


def option_differences(
    saved: dict[str, Any], given: dict[str, Any], section: str, allowed: set[str]
) -> tuple[list[str], list[str]]:
    """(forbidden, allowed) differences between a section's saved and given options, one line each."""
    forbidden, permitted = [], []
    for key in sorted(set(saved) | set(given)):
        if key.startswith("_") or key not in given or key not in saved:
            continue
        before, now = plain_options(saved[key]), plain_options(given[key])
        if before == now:
            continue
        if isinstance(before, list) and isinstance(now, list) and key == "callbacks":
            lines = callback_differences(before, now, f"{section}.{key}")
        else:
            lines = [f"{section}.{key}: {before!r} in the checkpoint, {now!r} now"]
        (permitted if key in allowed else forbidden).extend(lines)
    return forbidden, permitted


def callback_differences(saved: list[Any], given: list[Any], where: str) -> list[str]:
    """One line per callback added or removed and per changed setting, callbacks paired by class and order
    (the second ModelCheckpoint with the second)."""

    def keyed(callbacks: list[Any]) -> dict[tuple[str, int], dict[str, Any]]:
        result: dict[tuple[str, int], dict[str, Any]] = {}
        for callback in callbacks:
            entry = callback if isinstance(callback, dict) else {"class_path": str(callback)}
            name = str(entry.get("class_path", "?")).rsplit(".", 1)[-1]
            count = sum(1 for other, _ in result if other == name)
            result[(name, count)] = dict(entry.get("init_args") or {})
        return result

    before, now = keyed(saved), keyed(given)
    lines = []
    for key in [*before, *(k for k in now if k not in before)]:
        label = key[0] if key[1] == 0 else f"{key[0]} #{key[1] + 1}"
        if key not in now:
            lines.append(f"{where}: {label} removed")
        elif key not in before:
            lines.append(f"{where}: {label} added")
        else:
            for option in sorted(set(before[key]) | set(now[key])):
                old, new = before[key].get(option), now[key].get(option)
                if old != new:
                    lines.append(f"{where}: {label}.{option}: {old!r} in the checkpoint, {new!r} now")
    return lines


def check_resume_options(
    checkpoint_path: Path,
    checkpoint: dict[str, Any],
    model: dict[str, Any],
    data: dict[str, Any],
    trainer: dict[str, Any],
    saved_config: dict[str, Any] | None,
    forbidden_before: list[str] | None = None,
) -> list[str]:
    """Stop when the command's options would train another model than the checkpoint's run; return the
    permitted changes (to print). ``forbidden_before``: differences found before (resume_auto_micro_batch)."""
    forbidden, permitted = option_differences(
        checkpoint.get("hyper_parameters", {}), model, "model", RESUMABLE_MODEL_OPTIONS
    )
    data_forbidden, data_permitted = option_differences(
        checkpoint.get("datamodule_hyper_parameters", {}), data, "data", RESUMABLE_DATA_OPTIONS
    )
    forbidden = [*(forbidden_before or []), *forbidden, *data_forbidden]
    permitted += data_permitted
    if saved_config is not None:
        saved_trainer = {k: v for k, v in (saved_config.get("trainer") or {}).items() if k != "logger"}
        given_trainer = {k: v for k, v in trainer.items() if k != "logger"}
        allowed_trainer = set(given_trainer) - FIXED_TRAINER_OPTIONS
        trainer_forbidden, trainer_permitted = option_differences(
            saved_trainer, given_trainer, "trainer", allowed_trainer
        )
        forbidden += trainer_forbidden
        permitted += trainer_permitted
    if forbidden:
        listing = "\n".join(f"  {line}" for line in forbidden)
        raise Phi2TutorError(
            f"Cannot resume from {checkpoint_path}: these options differ from the run that wrote it, and a "
            f"resumed run trains the checkpoint's model with the checkpoint's settings:\n{listing}\n"
            "To continue that run, give the options it was started with (its config.yaml). To train with "
            "the new values, start a new run: leave out --ckpt_path (it gets a new version directory), and "
            "to start from what the old run learned, set model.adapter_path to its adapter directory."
        )
    return permitted


def reconcile_checkpoint_model_options(given: dict[str, Any], model: Any, subcommand: str) -> list[str]:
    """After LightningCLI replaced the model options with a checkpoint's hyperparameters: put back the
    given generation options (they do not change the weights) and describe every other option of the
    command that the checkpoint overrode, one line each (nothing silently ignored).

    ``given`` is the model section as parsed from the command, ``model`` the section after the
    checkpoint was read (a jsonargparse Namespace, changed in place).
    """
    lines = []
    for key in sorted(given):
        if key.startswith("_") or key not in model:
            continue
        before, now = plain_options(given[key]), plain_options(model[key])
        if before == now:
            continue
        if key in RESUMABLE_MODEL_OPTIONS:
            model[key] = given[key]
            lines.append(f"model.{key}: {before!r} as given (the checkpoint's run used {now!r})")
        elif subcommand != "fit":
            lines.append(
                f"model.{key}: the checkpoint's {now!r} is used, not {before!r}: {subcommand} evaluates "
                "the model the checkpoint holds"
            )
    return lines


def resume_auto_micro_batch(fit: Any, checkpoint: dict[str, Any]) -> tuple[list[str], str | None]:
    """``data.batch_size: auto`` on resume means the numbers the run resolved when it started (and after a
    first-step back-off): its micro-batch and effective batch (the checkpoint's data hyperparameters) and its
    accumulation (AutoMicroBatch's record). They replace auto in ``fit`` before the options are compared, so
    a resumed run trains as the interrupted one did. The options auto was resolved from (the effective batch,
    or the accumulation when none was given) must be the same: (forbidden differences, line to print)."""
    data = fit.get("data")
    if data is None or data.get("batch_size") != AUTO_BATCH:
        return [], None
    saved_data = checkpoint.get("datamodule_hyper_parameters") or {}
    record = (checkpoint.get("callbacks") or {}).get(AUTO_MICRO_BATCH_STATE_KEY, {}).get("record") or {}
    micro_batch = saved_data.get("batch_size")
    if not isinstance(micro_batch, int) or not record.get("configured"):
        raise Phi2TutorError(
            "data.batch_size auto on resume takes the micro-batch and accumulation the run resolved, but this "
            "checkpoint does not record them (a run of an older phi2tutor): give --data.batch_size and "
            "--trainer.accumulate_grad_batches as the run trained (its config.yaml)."
        )
    configured = record["configured"]
    forbidden = []
    given = {
        "data.effective_batch_size": data.get("effective_batch_size"),
        "trainer.accumulate_grad_batches": fit.get("trainer.accumulate_grad_batches"),
    }
    resolved_from = {
        "data.effective_batch_size": configured.get("effective_batch_size"),
        "trainer.accumulate_grad_batches": configured.get("accumulate_grad_batches"),
    }
    if resolved_from["data.effective_batch_size"] is not None:
        del given["trainer.accumulate_grad_batches"]  # replaced by the effective batch's, not an input
    for option, value in given.items():
        if plain_options(value) != plain_options(resolved_from[option]):
            forbidden.append(
                f"{option}: auto was resolved from {resolved_from[option]!r} in the checkpoint's run, {value!r} now"
            )
    effective = saved_data.get("effective_batch_size")
    replicas = (record.get("choice") or {}).get("replicas") or 1
    accumulation = (
        effective // (micro_batch * replicas) if effective else fit.get("trainer.accumulate_grad_batches")
    )
    data["batch_size"] = micro_batch
    data["effective_batch_size"] = effective
    fit["trainer.accumulate_grad_batches"] = accumulation
    line = (
        f"data.batch_size auto: the run's micro-batch {micro_batch} x accumulation {accumulation} (effective "
        f"batch {effective}), as it resolved when it started"
    )
    return forbidden, line


def saved_run_config(location: RunLocation | None) -> dict[str, Any] | None:
    """The config.yaml that LightningCLI wrote into the run directory at the start of fit, if any."""
    if location is None or not (location.directory / CONFIG_YAML).is_file():
        return None
    import yaml

    return yaml.safe_load((location.directory / CONFIG_YAML).read_text())


def plain_options(value: Any) -> Any:
    """A jsonargparse Namespace or a dataclass as the dict a checkpoint holds; numbers as floats when whole
    (YAML's 3 and the checkpoint's 3.0 are the same option)."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    elif hasattr(value, "__dataclass_fields__"):
        from dataclasses import asdict

        value = asdict(value)
    if isinstance(value, dict):
        return {k: plain_options(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_options(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def resolve_checkpoint_path(section: Any, subcommand: str) -> Path | None:
    """The checkpoint file that ``--ckpt_path`` names (``last``: the newest last.ckpt of the configured
    run), or None when none is given or Lightning resolves it (``best``, ``hpc``, ``registry``).

    ``section`` is LightningCLI's parsed section of the subcommand; its ckpt_path is set to the file.
    """
    requested = section.get("ckpt_path")
    if not requested or requested in ("hpc", "best", "registry"):
        return None
    if requested == "last":
        search_dirs = _checkpoint_dirs(section, _tensorboard_init_args(section.get("trainer.logger")))
        checkpoint_path = find_last_checkpoint(search_dirs)
        if checkpoint_path is None:
            looked = ", ".join(str(d) for d in search_dirs) or "(no checkpoint directory is configured)"
            start = (
                "leave out --ckpt_path to start a new run"
                if subcommand == "fit"
                else ("leave out --ckpt_path to evaluate model.adapter_path or the untrained model")
            )
            # A process killed between a step checkpoint and its last.ckpt copy leaves only the former.
            others = [path for directory in search_dirs for path in directory.glob("*.ckpt")]
            newest = max(others, key=lambda path: path.stat().st_mtime) if others else None
            if newest is not None:
                raise Phi2TutorError(
                    f"--ckpt_path last: no last.ckpt in {looked}, but {newest} is there (the newest "
                    f"checkpoint): give it as --ckpt_path {newest}, or {start}."
                )
            raise Phi2TutorError(
                f"--ckpt_path last: no last.ckpt in {looked}. Give the checkpoint's path "
                f"(lightning_logs/version_N/checkpoints/last.ckpt), or {start}; "
                "a run only writes last.ckpt with a ModelCheckpoint(save_last=true) callback."
            )
    else:
        checkpoint_path = Path(requested)
        if not checkpoint_path.is_file():
            raise Phi2TutorError(
                f"--ckpt_path {requested}: no such checkpoint file. Give the path of a .ckpt a run wrote "
                "(lightning_logs/version_N/checkpoints/), or `last` for the newest last.ckpt of this config's runs."
            )
    section["ckpt_path"] = str(checkpoint_path)
    return checkpoint_path


def resolve_fit_resume(fit: Any) -> None:
    """Before the Trainer is built: turn ``fit.ckpt_path`` (``last`` or a path) into the checkpoint file,
    point the logger at the run directory it continues, and check the options against the checkpoint's.

    ``fit`` is LightningCLI's parsed ``fit`` section (a jsonargparse Namespace), changed in place.
    """
    checkpoint_path = resolve_checkpoint_path(fit, "fit")
    if checkpoint_path is None:
        return
    logger = fit.get("trainer.logger")
    logger_args = _tensorboard_init_args(logger)
    from phi2tutor.loading import check_checkpoint

    # A damaged or foreign file stops here with one message (LightningCLI checks it only after this).
    checkpoint = check_checkpoint(checkpoint_path)
    if checkpoint is None:  # objects outside torch's allowlist: torch's own error says which
        import torch

        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    location = run_location(checkpoint_path)
    auto_forbidden, auto_line = resume_auto_micro_batch(fit, checkpoint)
    permitted = check_resume_options(
        checkpoint_path,
        checkpoint,
        plain_options(fit.get("model")) or {},
        plain_options(fit.get("data")) or {},
        plain_options(fit.get("trainer")) or {},
        saved_run_config(location),
        auto_forbidden,
    )
    from lightning.pytorch.utilities import rank_zero_info

    where = "a new run directory"
    if location is not None and logger_args is not None:
        logger_args["save_dir"] = str(location.save_dir)
        logger_args["name"] = location.name
        logger_args["version"] = location.version
        # TensorBoard drops what the interrupted segment logged after this step, so the resumed run's
        # events replace them instead of doubling them.
        logger["dict_kwargs"] = {**(logger.get("dict_kwargs") or {}), "purge_step": checkpoint["global_step"]}
        where = str(location.directory)
    rank_zero_info(
        f"phi2tutor | resuming from {checkpoint_path} (epoch {checkpoint['epoch'] + 1}, step "
        f"{checkpoint['global_step']}) into {where}"
    )
    if auto_line:
        rank_zero_info(f"phi2tutor | {auto_line}")
    for line in permitted:
        rank_zero_info(f"phi2tutor | changed on resume: {line}")


def _tensorboard_init_args(logger: Any) -> Any:
    """The init_args of a TensorBoardLogger config (None for another logger, a list or no logger)."""
    if logger is None or isinstance(logger, (bool, list)):
        return None
    class_path = str(logger.get("class_path", ""))
    return logger.get("init_args") if class_path.endswith("TensorBoardLogger") else None


def _checkpoint_dirs(fit: Any, logger_args: Any) -> list[Path]:
    """Where the configured run writes checkpoints: every version of its logger directory, and the
    ModelCheckpoint callbacks' own dirpath."""
    directories = []
    if logger_args is not None:
        root = Path(logger_args.get("save_dir") or ".") / (logger_args.get("name") or "lightning_logs")
        directories += sorted(root.glob("version_*/checkpoints")) or [root / "version_*" / "checkpoints"]
    else:
        directories.append(Path(fit.get("trainer.default_root_dir") or ".") / "checkpoints")
    for callback in fit.get("trainer.callbacks") or []:
        dirpath = (callback.get("init_args") or {}).get("dirpath") if hasattr(callback, "get") else None
        if dirpath:
            directories.append(Path(dirpath))
    return directories
