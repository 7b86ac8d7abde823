"""The training report's wording, in English and in Spanish (written for this project, not translated
word by word from the reference analysis), and its Markdown rendering from report.json's numbers.
"""

from __future__ import annotations

import re
from typing import Any

from phi2tutor.errors import Phi2TutorError

LANGUAGES = ("en", "es")


# --------------------------------------------------------------------------------------------- rendering
TEXT: dict[str, dict[str, str]] = {
    "en": {
        "title": "Training report: {run}",
        "source": "Written by phi2tutor from the run's own records: `{source}` ({kind}), {generated}.",
        "kind_phi2tutor-run": "phi2tutor run directory",
        "kind_trainer_state": "Hugging Face Trainer state",
        "unknown": "unknown",
        "general": "General information",
        "item": "Item",
        "value": "Value",
        "base_model": "Base model",
        "parameters": "Parameters (counted from the model)",
        "trainable": "Trainable parameters",
        "trainable_value": "{count} ({pct}% of all)",
        "hardware": "Hardware",
        "precision": "Precision",
        "quantization": "Quantization",
        "epochs": "Epochs run",
        "steps": "Optimizer steps",
        "started": "Started / ended",
        "duration": "Duration",
        "reported_mean_loss": "Mean loss reported by the Trainer (train_loss)",
        "days": "{n} days",
        "day": "{n} day",
        "hours": "{n} hours",
        "hour": "{n} hour",
        "minutes": "{n} minutes",
        "minute": "{n} minute",
        "seconds": "{n} seconds",
        "second": "{n} second",
        "duration_value": "{parts} ({minutes} minutes)",
        "duration_value_one": "{parts} ({minutes} minute)",
        "gpu": "{name}, {memory} MB, {sms} multiprocessors",
        "cuda_cores": " ({cores} CUDA cores)",
        "cpu": "CPU: {name}, {cores} cores",
        "memory": "Memory",
        "memory_device": "Device: {device}. Budget: {budget} MB.",
        "memory_kind": "Memory type",
        "memory_size": "Size (MB)",
        "memory_pct": "% of budget",
        "mem_allocated": "Allocated",
        "mem_reserved": "Reserved",
        "mem_max_allocated": "Max allocated",
        "mem_cpu_rss": "Process resident (CPU)",
        "mem_cpu_peak_rss": "Process peak resident (CPU)",
        "memory_peak": "Peak: {peak} MB, {pct}% of the budget; headroom {headroom} MB.",
        "memory_oom": "The run ran out of memory.",
        "memory_planner": "Memory planner for this config: estimated peak {estimate} MB at micro-batch {batch}; "
        "the largest micro-batch it expects to fit the budget is {largest}.",
        "phases": "Learning phases",
        "phases_given": "Phase boundaries given: last epochs {boundaries}.",
        "phases_online": "Boundaries found during training by PhaseDetection: {boundaries}.",
        "phases_online_none": "PhaseDetection found no boundary during training.",
        "start_loss": "Start loss: {value}",
        "end_loss": "Loss at the end of the phase: {value}",
        "improvement": "Improvement within the phase: {value}% ((start - end) / start)",
        "share": "Share of the total loss reduction: {value}%",
        "phase_rapid_learning": "rapid learning",
        "phase_fine_tuning": "fine-tuning",
        "phase_stabilization": "stabilization",
        "grad_norm": "Gradient norm",
        "grad_peak": "Peak: {peak} at epoch {epoch} (step {step})",
        "grad_settled": "Settled at about {level} (median of the last {tail}% of its values) from epoch {epoch} "
        "on: every later epoch's median stays under {factor} times that level",
        "grad_not_settled": "Not settled: the last epoch's median is above {factor} times the level of the last "
        "{tail}% of its values ({level})",
        "grad_last": "Last value: {value}",
        "grad_too_few": "Only {n} values logged: too few to tell whether it settled",
        "lr": "Learning rate",
        "lr_peak": "Peak: {peak} at epoch {epoch} (step {step})",
        "lr_first_last": "First value {first}, last value {last} ({pct}% of the peak)",
        "lr_shape": "Schedule: {shape}",
        "lr_phase_shortened": "PhaseAwareLR shortened it when rapid learning ended: from optimizer step {step}{at_epoch} "
        "the rate fell from {start} to its floor {floor} over {decay}, to step {end}, instead of the {left} the "
        "schedule had left",
        "lr_phase_logged_floor": "; the first logged train/lr at the floor is at step {step}",
        "lr_phase_at_floor": "PhaseAwareLR: rapid learning ended at optimizer step {step}{at_epoch}, with the rate "
        "already at its floor {floor}: nothing to shorten",
        "lr_phase_left_as_is": "PhaseAwareLR: rapid learning ended at optimizer step {step}{at_epoch}; the schedule "
        "already reached its floor {floor} in {left}, no later than the decay asked for: left as it was",
        "lr_phase_not_reached": "PhaseAwareLR was on, but PhaseDetection did not report the end of rapid learning: "
        "the schedule ran as configured",
        "lr_phase_epoch": " (after {epochs})",
        "lr_steps": "{n} optimizer steps",
        "lr_steps_one": "1 optimizer step",
        "lr_steps_epochs": "{n} optimizer steps ({epochs})",
        "lr_steps_epochs_one": "1 optimizer step ({epochs})",
        "shape_constant": "constant (every logged value within 10% of the peak)",
        "shape_warmup_constant": "warm-up over the first {warmup}% of the steps, then within 10% of the peak",
        "shape_warmup_rising": "warm-up: still rising at the last logged value",
        "shape_too_few": "too few values logged to tell",
        "shape_warmup_cosine": "warm-up over the first {warmup}% of the steps, then cosine decay",
        "shape_warmup_linear": "warm-up over the first {warmup}% of the steps, then linear decay",
        "shape_warmup_decay": "warm-up over the first {warmup}% of the steps, then decay",
        "shape_cosine": "cosine decay from the start",
        "shape_linear": "linear decay from the start",
        "shape_decay": "decay from the start",
        "validation": "Validation",
        "accuracy": "Answer accuracy (final answers right on held-out problems)",
        "acc_first": "First: {value}% at epoch {epoch}",
        "acc_first_before": "Before training: {value}%",
        "acc_best": "Best: {value}% at epoch {epoch}",
        "acc_last": "Last: {value}% at epoch {epoch}",
        "acc_trend_rising": "Trend: still rising at the end ({previous}% before, {last}% last)",
        "acc_trend_flat": "Trend: flat, the last {n} evaluations lie within {spread} points",
        "acc_trend_flat_one": "Trend: flat, the last {n} evaluations lie within {spread} point",
        "acc_trend_flat_equal": "Trend: flat, the last {n} evaluations are equal ({last}%)",
        "acc_trend_falling": "Trend: falling, the last evaluation is below the best",
        "acc_trend_mixed": "Trend: mixed",
        "acc_trend_single": "Trend: one evaluation only",
        "stop": "Why the run stopped",
        "stop_max_epochs": "It reached max_epochs ({epoch}).",
        "stop_plateau": "PlateauStopping stopped it at epoch {epoch}: the loss had stopped improving.",
        "stop_early_stopping": "Early stopping ({callback}) stopped it at epoch {epoch}.",
        "stop_interrupted": "It was interrupted ({exception}) during epoch {epoch}; this report uses what was "
        "logged until then.",
        "stop_failed": "It failed with {exception} during epoch {epoch}; this report uses what was logged until "
        "then.",
        "stop_stopped_early": "It stopped at step {step} of max_steps {max_steps}, before its schedule ended: early "
        "stopping or an interruption (trainer_state.json does not say which).",
        "stop_unknown": "Unknown: the records do not say.",
        "stop_message": "Its message: {message}",
        "figures": "Figures",
        "fig_memory": "Memory over the optimizer steps, with the budget line.",
        "fig_answer_accuracy": "Answer accuracy by epoch.",
        "recommendations": "Recommendations",
        "rec_max_epochs": "Train for fewer epochs: after epoch {epoch} the loss fell by only {remaining}% of the "
        "run's total reduction (under {threshold}%), so a max_epochs near {epoch} would have saved "
        "{saved} epochs ({saved_pct}% of the run).",
        "rec_still_improving": "Train for longer: over the last {window} epochs the loss still fell by "
        "{improvement}%.",
        "rec_larger_micro_batch": "Memory headroom: the peak used {pct}% of the {budget} MB budget ({headroom} MB "
        "free). By the memory planner a micro-batch (data.batch_size) of up to {largest} fits, now {batch}: "
        "raise it and lower trainer.accumulate_grad_batches to keep the effective batch (data.batch_size: auto "
        "does both), for faster epochs.",
        "rec_memory_tight": "Memory is tight: the peak used {pct}% of the budget (over {threshold}%, {headroom} MB "
        "free). Lower data.batch_size or data.max_length, or turn on gradient checkpointing, before "
        "anything makes a step longer.",
        "rec_accuracy_rising": "Answer accuracy was still rising at the last evaluation: more epochs may still "
        "pay off.",
        "rec_accuracy_flat": "Answer accuracy is flat over the last evaluations: more epochs of the same "
        "training are unlikely to help; change the data, the rank or the learning rate instead.",
        "rec_accuracy_falling": "Answer accuracy fell from its best (epoch {epoch}): keep the checkpoint of that "
        "epoch (ModelCheckpoint on val/answer_accuracy), or stop earlier.",
        "rec_truncated": "{count} training examples were cut at max_length {max_length}: their ends were never "
        "learned. Raise data.max_length or shorten those answers.",
        "rec_truncated_one": "{count} training example was cut at max_length {max_length}: its end was never "
        "learned. Raise data.max_length or shorten that answer.",
        "no_recommendations": "None: nothing in the records calls for a change.",
        "notes": "Notes",
        "note_no_memory": "No memory.json: the memory section is left out. Add callbacks.memory.GPUMemoryProfiler "
        "to the run to record it.",
        "note_no_config_for_planner": "No config.yaml in the run directory: the memory planner was not asked "
        "about a larger micro-batch.",
        "note_planner_failed": "The memory planner could not read the config: {error}",
        "note_online_phases_differ": "The boundaries found during training ({online}) differ from the ones found "
        "now ({offline}): the run was resumed or its options changed.",
        "note_no_grad_norm": "No gradient norm was logged: its section is left out.",
        "note_no_answer_accuracy": "No answer accuracy was logged: add callbacks.math_eval.MathAnswerEval to "
        "measure it.",
    },
    "es": {
        "title": "Informe del entrenamiento: {run}",
        "source": "Escrito por phi2tutor a partir de los registros del propio entrenamiento: `{source}` ({kind}), "
        "{generated}.",
        "kind_phi2tutor-run": "directorio de una ejecución de phi2tutor",
        "kind_trainer_state": "estado del Trainer de Hugging Face",
        "unknown": "desconocido",
        "general": "Información general",
        "item": "Característica",
        "value": "Valor",
        "base_model": "Modelo base",
        "parameters": "Parámetros (contados en el modelo)",
        "trainable": "Parámetros entrenables",
        "trainable_value": "{count} ({pct}% del total)",
        "hardware": "Hardware",
        "precision": "Precisión",
        "quantization": "Cuantización",
        "epochs": "Épocas entrenadas",
        "steps": "Pasos del optimizador",
        "started": "Inicio / fin",
        "duration": "Duración",
        "reported_mean_loss": "Pérdida media según el Trainer (train_loss)",
        "days": "{n} días",
        "day": "{n} día",
        "hours": "{n} horas",
        "hour": "{n} hora",
        "minutes": "{n} minutos",
        "minute": "{n} minuto",
        "seconds": "{n} segundos",
        "second": "{n} segundo",
        "duration_value": "{parts} ({minutes} minutos)",
        "duration_value_one": "{parts} ({minutes} minuto)",
        "gpu": "{name}, {memory} MB, {sms} multiprocesadores",
        "cuda_cores": " ({cores} núcleos CUDA)",
        "cpu": "CPU: {name}, {cores} núcleos",
        "memory": "Memoria",
        "memory_device": "Dispositivo: {device}. Presupuesto: {budget} MB.",
        "memory_kind": "Tipo de memoria",
        "memory_size": "Tamaño (MB)",
        "memory_pct": "% del presupuesto",
        "mem_allocated": "Asignada",
        "mem_reserved": "Reservada",
        "mem_max_allocated": "Máxima asignada",
        "mem_cpu_rss": "Residente del proceso (CPU)",
        "mem_cpu_peak_rss": "Pico residente del proceso (CPU)",
        "memory_peak": "Pico: {peak} MB, el {pct}% del presupuesto; quedan libres {headroom} MB.",
        "memory_oom": "El entrenamiento se quedó sin memoria.",
        "memory_planner": "Planificador de memoria para esta configuración: pico estimado de {estimate} MB con "
        "micro-lote {batch}; el mayor micro-lote que cabe en el presupuesto según su estimación es {largest}.",
        "phases": "Fases del aprendizaje",
        "phases_given": "Límites de fase indicados: últimas épocas {boundaries}.",
        "phases_online": "Límites hallados durante el entrenamiento por PhaseDetection: {boundaries}.",
        "phases_online_none": "PhaseDetection no halló ningún límite durante el entrenamiento.",
        "start_loss": "Pérdida inicial: {value}",
        "end_loss": "Pérdida al final de la fase: {value}",
        "improvement": "Mejora dentro de la fase: {value}% ((inicial - final) / inicial)",
        "share": "Parte de la reducción total de la pérdida: {value}%",
        "phase_rapid_learning": "aprendizaje rápido",
        "phase_fine_tuning": "ajuste fino",
        "phase_stabilization": "estabilización",
        "grad_norm": "Norma del gradiente",
        "grad_peak": "Máximo: {peak} en la época {epoch} (paso {step})",
        "grad_settled": "Se estabilizó en torno a {level} (mediana del último {tail}% de sus valores) desde la "
        "época {epoch}: la mediana de cada época posterior queda por debajo de {factor} veces ese nivel",
        "grad_not_settled": "No se estabilizó: la mediana de la última época supera {factor} veces el nivel del "
        "último {tail}% de sus valores ({level})",
        "grad_last": "Último valor: {value}",
        "grad_too_few": "Solo se registraron {n} valores: demasiado pocos para saber si se estabilizó",
        "lr": "Learning rate (tasa de aprendizaje)",
        "lr_peak": "Máximo: {peak} en la época {epoch} (paso {step})",
        "lr_first_last": "Primer valor {first}, último valor {last} (el {pct}% del máximo)",
        "lr_shape": "Programa: {shape}",
        "lr_phase_shortened": "PhaseAwareLR lo acortó al terminar el aprendizaje rápido: desde el paso del "
        "optimizador {step}{at_epoch} la tasa bajó de {start} a su mínimo {floor} en {decay}, hasta el paso {end}, en "
        "lugar de los {left} que le quedaban al programa",
        "lr_phase_logged_floor": "; el primer train/lr registrado en el mínimo está en el paso {step}",
        "lr_phase_at_floor": "PhaseAwareLR: el aprendizaje rápido terminó en el paso del optimizador {step}{at_epoch}, "
        "con la tasa ya en su mínimo {floor}: nada que acortar",
        "lr_phase_left_as_is": "PhaseAwareLR: el aprendizaje rápido terminó en el paso del optimizador "
        "{step}{at_epoch}; el programa ya llegaba a su mínimo {floor} en {left}, no más tarde que el descenso "
        "pedido: se dejó como estaba",
        "lr_phase_not_reached": "PhaseAwareLR estaba activo, pero PhaseDetection no señaló el final del aprendizaje "
        "rápido: el programa siguió como estaba configurado",
        "lr_phase_epoch": " (tras {epochs})",
        "lr_steps": "{n} pasos del optimizador",
        "lr_steps_one": "1 paso del optimizador",
        "lr_steps_epochs": "{n} pasos del optimizador ({epochs})",
        "lr_steps_epochs_one": "1 paso del optimizador ({epochs})",
        "shape_constant": "constante (todos los valores registrados a menos de un 10% del máximo)",
        "shape_warmup_constant": "calentamiento durante el primer {warmup}% de los pasos y después a menos de un "
        "10% del máximo",
        "shape_warmup_rising": "calentamiento: aún subía en el último valor registrado",
        "shape_too_few": "demasiado pocos valores registrados para saberlo",
        "shape_warmup_cosine": "calentamiento durante el primer {warmup}% de los pasos y después decaimiento "
        "coseno",
        "shape_warmup_linear": "calentamiento durante el primer {warmup}% de los pasos y después decaimiento "
        "lineal",
        "shape_warmup_decay": "calentamiento durante el primer {warmup}% de los pasos y después decaimiento",
        "shape_cosine": "decaimiento coseno desde el principio",
        "shape_linear": "decaimiento lineal desde el principio",
        "shape_decay": "decaimiento desde el principio",
        "validation": "Validación",
        "accuracy": "Aciertos de la respuesta final (problemas reservados)",
        "acc_first": "Primera evaluación: {value}% en la época {epoch}",
        "acc_first_before": "Antes de entrenar: {value}%",
        "acc_best": "Mejor: {value}% en la época {epoch}",
        "acc_last": "Última: {value}% en la época {epoch}",
        "acc_trend_rising": "Tendencia: todavía al alza al final ({previous}% antes, {last}% en la última)",
        "acc_trend_flat": "Tendencia: estable, las últimas {n} evaluaciones caben en {spread} puntos",
        "acc_trend_flat_one": "Tendencia: estable, las últimas {n} evaluaciones caben en {spread} punto",
        "acc_trend_flat_equal": "Tendencia: estable, las últimas {n} evaluaciones son iguales ({last}%)",
        "acc_trend_falling": "Tendencia: a la baja, la última evaluación queda por debajo de la mejor",
        "acc_trend_mixed": "Tendencia: irregular",
        "acc_trend_single": "Tendencia: solo hay una evaluación",
        "stop": "Por qué terminó el entrenamiento",
        "stop_max_epochs": "Llegó a max_epochs ({epoch}).",
        "stop_plateau": "PlateauStopping lo detuvo en la época {epoch}: la pérdida había dejado de mejorar.",
        "stop_early_stopping": "La parada temprana ({callback}) lo detuvo en la época {epoch}.",
        "stop_interrupted": "Se interrumpió ({exception}) durante la época {epoch}; este informe usa lo "
        "registrado hasta entonces.",
        "stop_failed": "Falló con {exception} durante la época {epoch}; este informe usa lo registrado hasta "
        "entonces.",
        "stop_stopped_early": "Se detuvo en el paso {step} de max_steps {max_steps}, antes de acabar su programa: "
        "parada temprana o interrupción (trainer_state.json no dice cuál).",
        "stop_unknown": "Desconocido: los registros no lo dicen.",
        "stop_message": "Su mensaje: {message}",
        "figures": "Figuras",
        "fig_memory": "Memoria a lo largo de los pasos del optimizador, con la línea del presupuesto.",
        "fig_answer_accuracy": "Aciertos de la respuesta por época.",
        "recommendations": "Recomendaciones",
        "rec_max_epochs": "Entrenar menos épocas: tras la época {epoch} la pérdida solo bajó un {remaining}% de la "
        "reducción total (menos del {threshold}%), así que un max_epochs cercano a {epoch} habría ahorrado "
        "{saved} épocas (el {saved_pct}% del entrenamiento).",
        "rec_still_improving": "Entrenar más: en las últimas {window} épocas la pérdida aún bajó un "
        "{improvement}%.",
        "rec_larger_micro_batch": "Margen de memoria: el pico usó el {pct}% de los {budget} MB del presupuesto "
        "(quedan {headroom} MB). Según el planificador de memoria cabe un micro-lote (data.batch_size) de hasta "
        "{largest}, ahora {batch}: súbelo y baja trainer.accumulate_grad_batches para conservar el lote "
        "efectivo (data.batch_size: auto hace ambas cosas); las épocas serán más rápidas.",
        "rec_memory_tight": "La memoria va justa: el pico usó el {pct}% del presupuesto (más del {threshold}%, "
        "quedan {headroom} MB). Baja data.batch_size o data.max_length, o activa el gradient checkpointing, "
        "antes de que algo alargue un paso.",
        "rec_accuracy_rising": "Los aciertos seguían subiendo en la última evaluación: más épocas aún pueden "
        "compensar.",
        "rec_accuracy_flat": "Los aciertos no se mueven en las últimas evaluaciones: más épocas del mismo "
        "entrenamiento difícilmente ayudarán; cambia los datos, el rango o el learning rate.",
        "rec_accuracy_falling": "Los aciertos bajaron desde su mejor valor (época {epoch}): conserva el checkpoint "
        "de esa época (ModelCheckpoint sobre val/answer_accuracy) o detén antes el entrenamiento.",
        "rec_truncated": "{count} ejemplos de entrenamiento se cortaron en max_length {max_length}: su final nunca "
        "se aprendió. Sube data.max_length o acorta esas respuestas.",
        "rec_truncated_one": "{count} ejemplo de entrenamiento se cortó en max_length {max_length}: su final nunca "
        "se aprendió. Sube data.max_length o acorta esa respuesta.",
        "no_recommendations": "Ninguna: nada en los registros pide un cambio.",
        "notes": "Notas",
        "note_no_memory": "No hay memory.json: se omite la sección de memoria. Añade "
        "callbacks.memory.GPUMemoryProfiler al entrenamiento para registrarla.",
        "note_no_config_for_planner": "No hay config.yaml en el directorio: no se consultó al planificador de "
        "memoria sobre un micro-lote mayor.",
        "note_planner_failed": "El planificador de memoria no pudo leer la configuración: {error}",
        "note_online_phases_differ": "Los límites hallados durante el entrenamiento ({online}) no coinciden con "
        "los de ahora ({offline}): se reanudó el entrenamiento o cambiaron sus opciones.",
        "note_no_grad_norm": "No se registró la norma del gradiente: se omite su sección.",
        "note_no_answer_accuracy": "No se registraron aciertos de la respuesta: añade "
        "callbacks.math_eval.MathAnswerEval para medirlos.",
    },
}


# Wording of the sections that read the logged points, validation, NaN and the stop reason from the state.
TEXT["en"].update(
    {
        "unit_epoch": "epoch",
        "unit_epochs": "epochs",
        "unit_step": "step",
        "unit_steps": "steps",
        "epochs_value": "{run} of {max}",
        "epochs_partial": "{run} of {max}: {complete} complete, the last ({epoch}) partial ({fraction} of it)",
        "at_epoch": "at epoch {n}",
        "at_step": "at step {n}",
        "after_last_epoch": "after the last epoch ({n})",
        "after_last_step": "after the last step ({n})",
        "after_epoch": "after epoch {n}",
        "after_step": "after step {n}",
        "coverage": "This report covers the run up to step {step} (epoch {epoch}) of max_steps {max}: {why}",
        "coverage_checkpoint": "the state was saved while the run was still going.",
        "coverage_other": "the records end there.",
        "loss": "Training loss",
        "loss_first": "First logged loss: {value} (step {step}, epoch {epoch})",
        "loss_last": "Last logged loss: {value} (step {step}, epoch {epoch})",
        "loss_last_finite": "Last finite loss: {value} (step {step}, epoch {epoch})",
        "loss_smoothed": "Smoothed final loss: {value} (median of the last {n} logged {points}, steps {a}-{b})",
        "point": "point",
        "points": "points",
        "loss_reduction_last": "Observed change from the first logged loss to the last: {pct}% (positive: it fell)",
        "loss_reduction": "Observed change from the first logged loss: {pct}% to the last, {spct}% to the smoothed "
        "final loss (positive: it fell)",
        "last_median": "the median of its last {n} points",
        "last_median_one": "its last point",
        "first_median": "the median of its first {n} points",
        "first_median_one": "its first point",
        "trend_fell": "The loss fell: {last} ({tail}) is {change}% below {first} ({head}), {z} standard errors "
        "beyond its noise ({noise}% per point).",
        "trend_rose": "The loss rose: {last} ({tail}) is above {first} ({head}) by more than its noise allows "
        "({z} standard errors).",
        "trend_fell_first": "The loss fell: {last} ({tail}) is {change}% below its first logged loss ({first_value}), "
        "{z} standard errors beyond its noise ({noise}% per point); the fall came early: {first} is already "
        "{head}.",
        "trend_rose_first": "The loss rose: {last} ({tail}) is above its first logged loss ({first_value}) by more "
        "than its noise allows ({z} standard errors); {first} is {head}.",
        "trend_flat": "No learning: the loss stayed at {tail} within its noise from start to end ({first}: {head}, "
        "its first logged loss {first_value}; change {change}%, {z} standard errors of {se}%, under the {need} "
        "the test asks for).",
        "trend_flat_one": "No learning: the loss stayed at {tail} within its noise from start to end (its first "
        "point: {head}; change {change}%, {z} standard errors of {se}%, under the {need} the test asks for).",
        "trend_too_few_points": "Only {count} logged points: too few to tell a trend from noise.",
        "trend_too_few_points_one": "Only {count} logged point: too few to tell a trend from noise.",
        "chance": "{level} is ln {k}: the loss of a {k}-way classifier that guesses at chance.",
        "epoch_means": "Epoch means (complete epochs)",
        "epoch_col": "Epoch",
        "mean_col": "Mean loss",
        "points_col": "Logged points",
        "partial_epoch": "The last epoch ({epoch}) is partial: {fraction} of it ran ({count} logged points); the "
        "epoch means leave it out.",
        "partial_epoch_one": "The last epoch ({epoch}) is partial: {fraction} of it ran ({count} logged point); the "
        "epoch means leave it out.",
        "phases_detected": "Phases looked for on the {series} by phi2tutor.phases, the rule the PhaseDetection "
        "callback applies during training: the improvement rate is the slope of the log loss over a window of "
        "{window} {units}; fine-tuning begins below {ft} and stabilization below {st} of the fastest rate, each "
        "only where the ending phase's fastest rate and its fall from it stand {z} standard errors above the "
        "curve's own noise (in log space).",
        "window_from_length": "The run has no PhaseDetection options, so the window is a tenth of its {points} "
        "points, kept between {low} and {high}.",
        "series_epoch_mean": "epoch mean loss",
        "series_logged": "logged training loss",
        "series_checked_step": "values of {monitor} that PhaseDetection checked during training ({every}; run.json "
        "keeps them)",
        "checked_every_step": "at every optimizer step",
        "checked_every_n_steps": "every {n} optimizer steps",
        "series_checked_epoch": "values of {monitor} that PhaseDetection checked at each epoch end (run.json keeps "
        "them)",
        "unit_checks": "checks",
        "phase_points_checked": "Checks: {count} ({pct}% of the run's)",
        "verdict_fell_steadily": "The loss fell steadily: no distinct phases (no slow-down stood above the noise).",
        "verdict_flat": "No phases: the loss did not fall beyond its noise.",
        "verdict_rose": "No phases: the loss rose.",
        "verdict_too_few_points": "No phases: too few points to tell.",
        "total_reduction": "Total loss reduction: {pct}% (from {start} {at_first} to {end} {at_last})",
        "total_rise": "Total loss change: it rose by {pct}% (from {start} {at_first} to {end} {at_last})",
        "phase_heading": "Phase {number}: {name} ({units} {first}-{last})",
        "phase_began_at_end": "The {name} phase began {after}.",
        "phase_points": "{Units}: {count} ({pct}% of the run)",
        "phase_points_step": "Logged points: {count} ({pct}% of the run's)",
        "phase_just_begun": "The {name} phase began {after}: {count} points logged since, too few (under the "
        "window of {window}) to describe it.",
        "phase_just_begun_one": "The {name} phase began {after}: {count} point logged since, too few (under the "
        "window of {window}) to describe it.",
        "phase_just_begun_epoch": "The {name} phase began {after}: {count} epochs since, too few (under the window "
        "of {window}) to describe it.",
        "phase_just_begun_epoch_one": "The {name} phase began {after}: {count} epoch since, too few (under the "
        "window of {window}) to describe it.",
        "phase_rose": "The loss rose within this phase.",
        "nonfinite": "NaN and inf",
        "nonfinite_loss": "training loss",
        "nonfinite_grad_norm": "gradient norm",
        "nonfinite_val_loss": "validation loss",
        "nonfinite_line": "The {series} is {kind} from step {step} (epoch {epoch}) on: {count} of {of} logged values.",
        "val_loss": "Validation loss ({key}, {n} {evaluations}): first {first} (step {first_step}), best {best} "
        "(step {best_step}, epoch {best_epoch}), last {last} (step {last_step}, epoch {last_epoch})",
        "val_loss_one": "Validation loss ({key}, 1 evaluation): {last} (step {last_step}, epoch {last_epoch})",
        "evaluation": "evaluation",
        "evaluations": "evaluations",
        "overfitting": "Overfitting: from step {step} (epoch {epoch}) the validation loss rose from {best} to {last} "
        "(+{rise}%) while the training loss fell from {train_best} to {train_last} ({fall}%; medians of the {n} "
        "logged points up to each step). The checkpoint of the lowest validation loss is the one of step {step}.",
        "overfitting_one": "Overfitting: from step {step} (epoch {epoch}) the validation loss rose from {best} to "
        "{last} (+{rise}%) while the training loss fell from {train_best} to {train_last} ({fall}%; the last "
        "logged point up to each step). The checkpoint of the lowest validation loss is the one of step {step}.",
        "val_rising": "After its best (step {step}) the validation loss rose by {rise}% to {last}, and the training "
        "loss did not fall meanwhile.",
        "val_after_best": "After its best the validation loss changed by {rise}% (overfitting is named above "
        "{threshold}%).",
        "other_metrics": "Other evaluation metrics (as logged)",
        "grouped_metrics": "Per-group evaluation metrics (as logged)",
        "grouped_metrics_intro": "{count} groups log the same metrics ({pattern}): each metric's cell is its last "
        "value, with the lowest and highest over the run in parentheses (one number: it never changed). First "
        "values and the step of each value are in report.json.",
        "last_at_step": "(the last at step {step})",
        "group_col": "Group",
        "metric": "Metric",
        "first_col": "First (step)",
        "last_col": "Last (step)",
        "lowest_col": "Lowest (step)",
        "highest_col": "Highest (step)",
        "stop_max_steps": "It finished: it reached max_steps ({step}).",
        "stop_early_stopping_trainer": "EarlyStoppingCallback stopped it at step {step} (epoch {epoch}): "
        "{counter} evaluations without improvement of {metric}, its patience {patience}.",
        "stop_early_stopping_trainer_one": "EarlyStoppingCallback stopped it at step {step} (epoch {epoch}): "
        "{counter} evaluation without improvement of {metric}, its patience {patience}.",
        "es_metric": "{metric} (the metric for best model: best {best} at step {best_step})",
        "es_metric_unknown": "the metric for best model (the state does not name it)",
        "stop_checkpoint": "It was still running: this state was saved at step {step} of max_steps {max_steps} "
        "(TrainerControl.should_training_stop is false).",
        "stop_stopped": "A callback stopped it at step {step} of max_steps {max_steps} (should_training_stop).",
        "stop_ended_before_max_steps": "The state ends at step {step} of max_steps {max_steps}: a checkpoint taken "
        "mid-run or a run stopped early; this state file (no stateful_callbacks) does not say which.",
        "fig_loss": "Training loss at its logged points (epoch means, validation loss, phases and the first NaN "
        "where there are any).",
        "fig_grad_norm_lr": "Gradient norm and learning rate, as logged.",
        "rec_nonfinite_phi2tutor": "The loss or the gradients became NaN/inf at step {step}: lower "
        "model.learning_rate, set trainer.gradient_clip_val (1.0), and in 16-bit precision keep the fp32 "
        "attention scores (model.attn_implementation phi2tutor_fp32_scores) or train in bf16-mixed or 32-true.",
        "rec_nonfinite_trainer": "The loss or the gradients became NaN/inf at step {step}: lower learning_rate, keep "
        "max_grad_norm at 1.0 or lower, and in fp16 compute attention scores in fp32 or use bf16=True instead.",
        "rec_overfitting_phi2tutor": "Stop at the epoch of the lowest val/loss ({epoch}): keep its checkpoint with "
        "ModelCheckpoint(monitor='val/loss', mode='min'), stop with PlateauStopping on val/loss, or set "
        "trainer.max_epochs near {epoch}.",
        "rec_overfitting_trainer": "Stop at the lowest eval_loss (step {step}, epoch {epoch}): set "
        "load_best_model_at_end=True with metric_for_best_model='eval_loss' (save_strategy equal to "
        "eval_strategy), add EarlyStoppingCallback, or lower num_train_epochs to about {epoch}.",
        "rec_val_rising_phi2tutor": "The validation loss rose after step {step}: look at the validation data "
        "and model.learning_rate before training longer.",
        "rec_val_rising_trainer": "eval_loss rose after step {step}: look at the eval data and learning_rate "
        "before training longer.",
        "rec_no_learning_phi2tutor": "The loss did not move from {level}: raise model.learning_rate or check that "
        "the answers reach the loss (data.max_length, the prompt template).",
        "rec_no_learning_trainer": "The loss did not move from {level}: raise learning_rate, check that the labels "
        "reach the loss, and that the trainable parameters are the ones meant to learn.",
        "rec_max_epochs_phi2tutor": "Train for fewer epochs: after epoch {epoch} (loss {at}) the loss fell only "
        "{remaining}% of the run's total reduction more (under {threshold}%, to {final}), so trainer.max_epochs "
        "{epoch} would have saved {saved} {epochs} ({saved_pct}% of the run).",
        "rec_max_epochs_trainer": "Train for fewer epochs: after epoch {epoch} (loss {at}) the loss fell only "
        "{remaining}% of the run's total reduction more (under {threshold}%, to {final}), so num_train_epochs "
        "{epoch} would have saved {saved} {epochs} ({saved_pct}% of the run).",
        "rec_still_improving_phi2tutor": "Train for longer: over the second half of the run ({unit}s {a}-{b}) the "
        "loss still fell from {head} to {tail} ({change}%, medians of {n} points); raise trainer.max_epochs.",
        "rec_still_improving_phi2tutor_one": "Train for longer: over the second half of the run ({unit}s {a}-{b}) "
        "the loss still fell from {head} to {tail} ({change}%, its first and last points there); raise "
        "trainer.max_epochs.",
        "rec_still_improving_trainer": "Train for longer: over the second half of the run ({unit}s {a}-{b}) the "
        "loss still fell from {head} to {tail} ({change}%, medians of {n} points); raise num_train_epochs "
        "(or max_steps).",
        "rec_still_improving_trainer_one": "Train for longer: over the second half of the run ({unit}s {a}-{b}) "
        "the loss still fell from {head} to {tail} ({change}%, its first and last points there); raise "
        "num_train_epochs (or max_steps).",
        "note_no_memory_state": "The Trainer state holds no memory figures: the memory section is left out.",
        "note_too_few_points_for_phases": "Only {points} {unit} points: the phase rule needs {window} before it can "
        "end a phase.",
        "note_too_few_points_for_phases_one": "Only {points} {unit} point: the phase rule needs {window} before it "
        "can end a phase.",
        "note_no_validation": "No validation was logged (no validation loss, no eval metric): the validation "
        "section is left out.",
        "note_no_learning_rate": "No learning rate was logged: its section is left out.",
    }
)
TEXT["es"].update(
    {
        "unknown_f": "desconocida",
        "unit_epoch": "época",
        "unit_epochs": "épocas",
        "unit_step": "paso",
        "unit_steps": "pasos",
        "epochs_value": "{run} de {max}",
        "epochs_partial": "{run} de {max}: {complete} completas, la última ({epoch}) parcial ({fraction} de ella)",
        "epochs_partial_one": "{run} de {max}: {complete} completa, la última ({epoch}) parcial ({fraction} de ella)",
        "at_epoch": "en la época {n}",
        "at_step": "en el paso {n}",
        "after_last_epoch": "después de la última época ({n})",
        "after_last_step": "después del último paso ({n})",
        "after_epoch": "después de la época {n}",
        "after_step": "después del paso {n}",
        "coverage": "Este informe cubre el entrenamiento hasta el paso {step} (época {epoch}) de max_steps {max}: {why}",
        "coverage_checkpoint": "el estado se guardó con el entrenamiento aún en marcha.",
        "coverage_other": "los registros terminan ahí.",
        "loss": "Pérdida de entrenamiento",
        "loss_first": "Primera pérdida registrada: {value} (paso {step}, época {epoch})",
        "loss_last": "Última pérdida registrada: {value} (paso {step}, época {epoch})",
        "loss_last_finite": "Última pérdida finita: {value} (paso {step}, época {epoch})",
        "loss_smoothed": "Pérdida final suavizada: {value} (mediana de los últimos {n} {points} registrados, pasos "
        "{a}-{b})",
        "point": "punto",
        "points": "puntos",
        "loss_reduction_last": "Cambio observado desde la primera pérdida registrada hasta la última: {pct}% "
        "(positivo: bajó)",
        "loss_reduction": "Cambio observado desde la primera pérdida registrada: {pct}% hasta la última, {spct}% "
        "hasta la pérdida final suavizada (positivo: bajó)",
        "last_median": "la mediana de sus últimos {n} puntos",
        "last_median_one": "su último punto",
        "first_median": "la mediana de sus primeros {n} puntos",
        "first_median_one": "su primer punto",
        "trend_fell": "La pérdida bajó: {last} ({tail}) queda un {change}% por debajo de {first} ({head}), {z} "
        "errores típicos más allá de su ruido ({noise}% por punto).",
        "trend_rose": "La pérdida subió: {last} ({tail}) supera {first} ({head}) más de lo que su ruido permite "
        "({z} errores típicos).",
        "trend_fell_first": "La pérdida bajó: {last} ({tail}) queda un {change}% por debajo de su primera pérdida "
        "registrada ({first_value}), {z} errores típicos más allá de su ruido ({noise}% por punto); la caída llegó "
        "pronto: {first} ya es {head}.",
        "trend_rose_first": "La pérdida subió: {last} ({tail}) supera su primera pérdida registrada ({first_value}) "
        "más de lo que su ruido permite ({z} errores típicos); {first} es {head}.",
        "trend_flat": "Sin aprendizaje: la pérdida se quedó en {tail} dentro de su ruido de principio a fin ({first}: "
        "{head}; su primera pérdida registrada: {first_value}; cambio del {change}%, {z} errores típicos de {se}%, "
        "menos de los {need} que pide la prueba).",
        "trend_flat_one": "Sin aprendizaje: la pérdida se quedó en {tail} dentro de su ruido de principio a fin (su "
        "primer punto: {head}; cambio del {change}%, {z} errores típicos de {se}%, menos de los {need} que pide la "
        "prueba).",
        "trend_too_few_points": "Solo {count} puntos registrados: demasiado pocos para distinguir una tendencia del "
        "ruido.",
        "trend_too_few_points_one": "Solo {count} punto registrado: demasiado poco para distinguir una tendencia del "
        "ruido.",
        "chance": "{level} es ln {k}: la pérdida de un clasificador de {k} clases que acierta al azar.",
        "epoch_means": "Medias por época (épocas completas)",
        "epoch_col": "Época",
        "mean_col": "Pérdida media",
        "points_col": "Puntos registrados",
        "partial_epoch": "La última época ({epoch}) es parcial: se ejecutó {fraction} de ella ({count} puntos "
        "registrados); las medias por época la dejan fuera.",
        "partial_epoch_one": "La última época ({epoch}) es parcial: se ejecutó {fraction} de ella ({count} punto "
        "registrado); las medias por época la dejan fuera.",
        "phases_detected": "Fases buscadas sobre {series} con phi2tutor.phases, la misma regla que aplica el "
        "callback PhaseDetection durante el entrenamiento: la velocidad de mejora es la pendiente del logaritmo "
        "de la pérdida en una ventana de {window} {units}; el ajuste fino empieza por debajo de {ft} y la "
        "estabilización por debajo de {st} de la mayor velocidad, cada una solo donde la mayor velocidad de la "
        "fase que termina y su caída desde ella superan en {z} errores típicos el ruido propio de la curva (en "
        "escala logarítmica).",
        "window_from_length": "El entrenamiento no tiene opciones de PhaseDetection, así que la ventana es una "
        "décima parte de sus {points} puntos, acotada entre {low} y {high}.",
        "series_epoch_mean": "la pérdida media por época",
        "series_logged": "la pérdida de entrenamiento registrada",
        "series_checked_step": "los valores de {monitor} que PhaseDetection comprobó durante el entrenamiento ({every}; "
        "run.json los guarda)",
        "checked_every_step": "en cada paso del optimizador",
        "checked_every_n_steps": "cada {n} pasos del optimizador",
        "series_checked_epoch": "los valores de {monitor} que PhaseDetection comprobó al final de cada época (run.json "
        "los guarda)",
        "unit_checks": "comprobaciones",
        "phase_points_checked": "Comprobaciones: {count} (el {pct}% del total)",
        "verdict_fell_steadily": "La pérdida bajó de forma continua: sin fases distintas (ninguna desaceleración "
        "superó el ruido).",
        "verdict_flat": "Sin fases: la pérdida no bajó más allá de su ruido.",
        "verdict_rose": "Sin fases: la pérdida subió.",
        "verdict_too_few_points": "Sin fases: demasiado pocos puntos para saberlo.",
        "total_reduction": "Reducción total de la pérdida: {pct}% (de {start} {at_first} a {end} {at_last})",
        "total_rise": "Cambio total de la pérdida: subió un {pct}% (de {start} {at_first} a {end} {at_last})",
        "phase_heading": "Fase {number}: {name} ({units} {first}-{last})",
        "phase_began_at_end": "La fase de {name} empezó {after}.",
        "phase_points": "{Units}: {count} (el {pct}% del entrenamiento)",
        "phase_points_step": "Puntos registrados: {count} (el {pct}% del total)",
        "phase_just_begun": "La fase de {name} empezó {after}: desde entonces hay {count} puntos registrados, "
        "demasiado pocos (menos que la ventana de {window}) para describirla.",
        "phase_just_begun_one": "La fase de {name} empezó {after}: desde entonces hay {count} punto registrado, "
        "demasiado poco (menos que la ventana de {window}) para describirla.",
        "phase_just_begun_epoch": "La fase de {name} empezó {after}: desde entonces hay {count} épocas, demasiado "
        "pocas (menos que la ventana de {window}) para describirla.",
        "phase_just_begun_epoch_one": "La fase de {name} empezó {after}: desde entonces hay {count} época, "
        "demasiado poca (menos que la ventana de {window}) para describirla.",
        "phase_rose": "La pérdida subió dentro de esta fase.",
        "nonfinite": "NaN e infinitos",
        "nonfinite_loss": "pérdida de entrenamiento",
        "nonfinite_grad_norm": "norma del gradiente",
        "nonfinite_val_loss": "pérdida de validación",
        "nonfinite_line": "La {series} es {kind} desde el paso {step} (época {epoch}): {count} de {of} valores "
        "registrados.",
        "val_loss": "Pérdida de validación ({key}, {n} {evaluations}): primera {first} (paso {first_step}), mejor "
        "{best} (paso {best_step}, época {best_epoch}), última {last} (paso {last_step}, época {last_epoch})",
        "val_loss_one": "Pérdida de validación ({key}, 1 evaluación): {last} (paso {last_step}, época {last_epoch})",
        "evaluation": "evaluación",
        "evaluations": "evaluaciones",
        "overfitting": "Sobreajuste: desde el paso {step} (época {epoch}) la pérdida de validación subió de {best} a "
        "{last} (+{rise}%) mientras la de entrenamiento bajaba de {train_best} a {train_last} ({fall}%; medianas "
        "de los {n} puntos registrados hasta cada paso). El checkpoint de la menor pérdida de validación es el del "
        "paso {step}.",
        "overfitting_one": "Sobreajuste: desde el paso {step} (época {epoch}) la pérdida de validación subió de "
        "{best} a {last} (+{rise}%) mientras la de entrenamiento bajaba de {train_best} a {train_last} ({fall}%; "
        "el último punto registrado hasta cada paso). El checkpoint de la menor pérdida de validación es el del "
        "paso {step}.",
        "val_rising": "Tras su mejor valor (paso {step}) la pérdida de validación subió un {rise}% hasta {last}, y la "
        "de entrenamiento no bajó mientras tanto.",
        "val_after_best": "Tras su mejor valor la pérdida de validación cambió un {rise}% (se habla de sobreajuste "
        "por encima del {threshold}%).",
        "other_metrics": "Otras métricas de evaluación (tal como se registraron)",
        "grouped_metrics": "Métricas de evaluación por grupo (tal como se registraron)",
        "grouped_metrics_intro": "{count} grupos registran las mismas métricas ({pattern}): la celda de cada "
        "métrica es su último valor, con el mínimo y el máximo del entrenamiento entre paréntesis (un solo número: "
        "no cambió nunca). Los primeros valores y el paso de cada valor están en report.json.",
        "last_at_step": "(la última en el paso {step})",
        "group_col": "Grupo",
        "metric": "Métrica",
        "first_col": "Primera (paso)",
        "last_col": "Última (paso)",
        "lowest_col": "Mínima (paso)",
        "highest_col": "Máxima (paso)",
        "stop_max_steps": "Terminó: llegó a max_steps ({step}).",
        "stop_early_stopping_trainer": "EarlyStoppingCallback lo detuvo en el paso {step} (época {epoch}): "
        "{counter} evaluaciones sin mejora de {metric}, con paciencia {patience}.",
        "stop_early_stopping_trainer_one": "EarlyStoppingCallback lo detuvo en el paso {step} (época {epoch}): "
        "{counter} evaluación sin mejora de {metric}, con paciencia {patience}.",
        "es_metric": "{metric} (la métrica del mejor modelo: la mejor, {best}, en el paso {best_step})",
        "es_metric_unknown": "la métrica del mejor modelo (el estado no dice cuál es)",
        "stop_checkpoint": "Seguía en marcha: este estado se guardó en el paso {step} de max_steps {max_steps} "
        "(TrainerControl.should_training_stop es false).",
        "stop_stopped": "Un callback lo detuvo en el paso {step} de max_steps {max_steps} (should_training_stop).",
        "stop_ended_before_max_steps": "El estado termina en el paso {step} de max_steps {max_steps}: un checkpoint "
        "intermedio o un entrenamiento detenido antes; este archivo (sin stateful_callbacks) no dice cuál.",
        "fig_loss": "Pérdida de entrenamiento en sus puntos registrados (medias por época, pérdida de validación, "
        "fases y el primer NaN donde los haya).",
        "fig_grad_norm_lr": "Norma del gradiente y learning rate, tal como se registraron.",
        "rec_nonfinite_phi2tutor": "La pérdida o los gradientes se volvieron NaN/inf en el paso {step}: baja "
        "model.learning_rate, fija trainer.gradient_clip_val (1.0) y, en 16 bits, conserva las puntuaciones de "
        "atención en fp32 (model.attn_implementation phi2tutor_fp32_scores) o entrena en bf16-mixed o 32-true.",
        "rec_nonfinite_trainer": "La pérdida o los gradientes se volvieron NaN/inf en el paso {step}: baja "
        "learning_rate, deja max_grad_norm en 1.0 o menos y, en fp16, calcula la atención en fp32 o usa bf16=True.",
        "rec_overfitting_phi2tutor": "Detén el entrenamiento en la época de menor val/loss ({epoch}): conserva su "
        "checkpoint con ModelCheckpoint(monitor='val/loss', mode='min'), detén con PlateauStopping sobre "
        "val/loss o fija trainer.max_epochs cerca de {epoch}.",
        "rec_overfitting_trainer": "Detén el entrenamiento en la evaluación de menor eval_loss (paso {step}, época "
        "{epoch}): fija load_best_model_at_end=True con metric_for_best_model='eval_loss' (save_strategy igual a "
        "eval_strategy), añade EarlyStoppingCallback o baja num_train_epochs a cerca de {epoch}.",
        "rec_val_rising_phi2tutor": "La pérdida de validación subió tras el paso {step}: revisa los datos de "
        "validación y model.learning_rate antes de entrenar más.",
        "rec_val_rising_trainer": "eval_loss subió tras el paso {step}: revisa los datos de evaluación y "
        "learning_rate antes de entrenar más.",
        "rec_no_learning_phi2tutor": "La pérdida no se movió de {level}: sube model.learning_rate o comprueba que "
        "las respuestas llegan a la pérdida (data.max_length, la plantilla del prompt).",
        "rec_no_learning_trainer": "La pérdida no se movió de {level}: sube learning_rate, comprueba que las "
        "etiquetas llegan a la pérdida y que los parámetros entrenables son los que deben aprender.",
        "rec_max_epochs_phi2tutor": "Entrenar menos épocas: tras la época {epoch} (pérdida {at}) la pérdida solo "
        "bajó un {remaining}% más de la reducción total (menos del {threshold}%, hasta {final}), así que "
        "trainer.max_epochs {epoch} habría ahorrado {saved} {epochs} (el {saved_pct}% del entrenamiento).",
        "rec_max_epochs_trainer": "Entrenar menos épocas: tras la época {epoch} (pérdida {at}) la pérdida solo "
        "bajó un {remaining}% más de la reducción total (menos del {threshold}%, hasta {final}), así que "
        "num_train_epochs {epoch} habría ahorrado {saved} {epochs} (el {saved_pct}% del entrenamiento).",
        "rec_still_improving_phi2tutor": "Entrenar más: en la segunda mitad ({unit}s {a}-{b}) la pérdida aún bajó de "
        "{head} a {tail} ({change}%, medianas de {n} puntos); sube trainer.max_epochs.",
        "rec_still_improving_phi2tutor_one": "Entrenar más: en la segunda mitad ({unit}s {a}-{b}) la pérdida aún bajó "
        "de {head} a {tail} ({change}%, de su primer a su último punto); sube trainer.max_epochs.",
        "rec_still_improving_trainer": "Entrenar más: en la segunda mitad ({unit}s {a}-{b}) la pérdida aún bajó de "
        "{head} a {tail} ({change}%, medianas de {n} puntos); sube num_train_epochs (o max_steps).",
        "rec_still_improving_trainer_one": "Entrenar más: en la segunda mitad ({unit}s {a}-{b}) la pérdida aún bajó "
        "de {head} a {tail} ({change}%, de su primer a su último punto); sube num_train_epochs (o max_steps).",
        "note_no_memory_state": "El estado del Trainer no guarda cifras de memoria: se omite la sección de memoria.",
        "note_too_few_points_for_phases": "Solo {points} puntos por {unit}: la regla de fases necesita {window} para "
        "cerrar una fase.",
        "note_too_few_points_for_phases_one": "Solo {points} punto por {unit}: la regla de fases necesita {window} "
        "para cerrar una fase.",
        "note_no_validation": "No se registró validación (ni pérdida de validación ni métricas de evaluación): se "
        "omite la sección de validación.",
        "note_no_learning_rate": "No se registró el learning rate: se omite su sección.",
    }
)
TEXT["es"]["unknown_mp"] = "desconocidos"
TEXT["es"]["unknown_fp"] = "desconocidas"
for _key in ("unknown_f", "unknown_mp", "unknown_fp"):
    TEXT["en"][_key] = TEXT["en"]["unknown"]
# The accuracy section's calculator line (calculator-assisted decoding).
TEXT["en"].update(
    {
        "acc_calculator_on": "Calculator: on (each `<<expression=` the tutor wrote was completed by "
        "phi2tutor.calculator)",
        "acc_calculator_counts": "; at the last evaluation (epoch {epoch}) it completed {calls} annotations, "
        "{changed}",
        "acc_calculator_counts_one": "; at the last evaluation (epoch {epoch}) it completed 1 annotation, {changed}",
        "acc_calculator_changed": "{changed} of which changed the model's own tokens",
        "acc_calculator_off": "Calculator: off (the answers are the model's own tokens)",
    }
)
# A run that stopped before its first epoch was complete (out of memory in the first steps): how far it got,
# where memory ran out, the planner's estimate and its ways to fit (phi2tutor.memory.ways_to_fit's kinds).
TEXT["en"].update(
    {
        "coverage_before_first_epoch": "This run stopped during epoch 1, before the epoch was complete: {steps} "
        "of its {per_epoch} optimizer steps had finished and {losses} training-loss {points} had been logged.",
        "loss_none": "No training loss was logged: the run stopped before its first logged step.",
        "memory_oom_at": "It ran out of memory at step {step} (epoch {epoch}), with {step} optimizer steps "
        "finished.",
        "memory_oom_at_one": "It ran out of memory at step 1 (epoch {epoch}), with 1 optimizer step finished.",
        "memory_oom_planner": "The memory planner estimated {estimate} MB on a CUDA device for this configuration, "
        "peaking in the {phase}; its largest terms: {terms}.",
        "rec_out_of_memory": "To fit the memory budget, as the memory planner advises for this configuration: "
        "{advice}.",
        "fit_now": " (now {value})",
        "fit_micro_batch": "lower data.batch_size{now} and raise trainer.accumulate_grad_batches by the same "
        "factor: same effective batch, activations shrink with the micro-batch",
        "fit_max_length": "lower data.max_length{now}: activations and attention scores grow with it",
        "fit_gradient_checkpointing": "set model.gradient_checkpointing: true (keeps one layer's activations, "
        "recomputes the rest)",
        "fit_nf4": "set model.quantization: nf4-double (an NF4 frozen base: about a quarter of its fp16 weight "
        "memory)",
        "fit_paged_optimizer": "set model.optimizer: paged_adamw8bit (one byte per optimizer state value, paged "
        "out under pressure)",
    }
)
TEXT["es"].update(
    {
        "acc_calculator_on": "Calculadora: activada (phi2tutor.calculator completó cada `<<expresión=` que "
        "escribió el tutor)",
        "acc_calculator_counts": "; en la última evaluación (época {epoch}) completó {calls} anotaciones, "
        "{changed}",
        "acc_calculator_counts_one": "; en la última evaluación (época {epoch}) completó 1 anotación, {changed}",
        "acc_calculator_changed": "{changed} de ellas cambiaron los tokens del propio modelo",
        "acc_calculator_changed_one": "1 de ellas cambió los tokens del propio modelo",
        "acc_calculator_off": "Calculadora: desactivada (las respuestas son los tokens del propio modelo)",
    }
)
TEXT["es"].update(
    {
        "coverage_before_first_epoch": "Este entrenamiento se detuvo durante la época 1, antes de completarla: "
        "habían terminado {steps} de sus {per_epoch} pasos del optimizador y se habían registrado {losses} "
        "{points} de la pérdida de entrenamiento.",
        "loss_none": "No se registró ninguna pérdida de entrenamiento: el entrenamiento se detuvo antes de su "
        "primer paso registrado.",
        "memory_oom_at": "Se quedó sin memoria en el paso {step} (época {epoch}), con {step} pasos del "
        "optimizador terminados.",
        "memory_oom_at_one": "Se quedó sin memoria en el paso 1 (época {epoch}), con 1 paso del optimizador "
        "terminado.",
        "memory_oom_planner": "El planificador de memoria estimó {estimate} MB en un dispositivo CUDA para esta "
        "configuración, con el máximo en la fase {phase}; sus términos mayores: {terms}.",
        "rec_out_of_memory": "Para caber en el presupuesto de memoria, como aconseja el planificador de memoria "
        "para esta configuración: {advice}.",
        "fit_now": " (ahora {value})",
        "fit_micro_batch": "baja data.batch_size{now} y sube trainer.accumulate_grad_batches en el mismo factor: "
        "el mismo lote efectivo, con activaciones que se reducen con el micro-lote",
        "fit_max_length": "baja data.max_length{now}: las activaciones y las puntuaciones de atención crecen con él",
        "fit_gradient_checkpointing": "pon model.gradient_checkpointing: true (guarda las activaciones de una "
        "capa y recalcula el resto)",
        "fit_nf4": "pon model.quantization: nf4-double (una base congelada en NF4: cerca de la cuarta parte de "
        "la memoria de sus pesos en fp16)",
        "fit_paged_optimizer": "pon model.optimizer: paged_adamw8bit (un byte por valor de estado del "
        "optimizador, paginado bajo presión)",
    }
)

NUMBER_PATTERN = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?:e[-+]?\d+)?(?![\w])")
"""A number in report text, not one inside a word (phi2tutor, version_0); tests compare report.md to report.json."""


def plural(count: Any, singular: str, many: str) -> str:
    return singular if count == 1 else many


def counted(t: dict[str, str], key: str, count: Any) -> str:
    """The wording ``key`` for ``count`` things: its ``_one`` form for exactly one, where it has one."""
    return t.get(f"{key}_one", t[key]) if count == 1 else t[key]


def fmt(value: Any, language: str = "en") -> str:
    """A number exactly as report.json stores it (so the two always agree); "unknown" for None."""
    if value is None:
        return TEXT[language]["unknown"]
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def fmt_count(value: int | None, language: str) -> str:
    """A large integer with thousands grouped: 2,779,683,840 (en), 2 779 683 840 (es)."""
    if value is None:
        return TEXT[language]["unknown"]
    grouped = f"{int(value):,}"
    return grouped if language == "en" else grouped.replace(",", " ")


def check_language(language: str) -> None:
    """Raise Phi2TutorError unless report.md can be written in ``language``."""
    if language not in LANGUAGES:
        raise Phi2TutorError(f"language {language!r} is not available: use one of {', '.join(LANGUAGES)}.")


def fitting_advice(ways: list[dict[str, Any]], language: str = "en") -> list[str]:
    """phi2tutor.memory.ways_to_fit's items in words, with the current value where it is known."""
    return _ways_in_words(ways, TEXT[language])


def _ways_in_words(ways: list[dict[str, Any]], t: dict[str, str]) -> list[str]:
    lines = []
    for way in ways:
        now = t["fit_now"].format(value=way["now"]) if way.get("now") is not None else ""
        lines.append(t[f"fit_{way['kind']}"].format(now=now))
    return lines


def render_markdown(report: dict[str, Any], language: str = "en") -> str:
    """report.md's text from report.json's content, in English ("en") or Spanish ("es")."""
    check_language(language)
    t = TEXT[language]

    def f(value: Any) -> str:
        return fmt(value, language)

    lines = [f"# {t['title'].format(run=report['run_name'])}", ""]
    lines += [
        t["source"].format(
            source=report["source"], kind=t[f"kind_{report['source_kind']}"], generated=report["generated_at"]
        ),
        "",
    ]
    c = report["coverage"]
    if c.get("before_first_epoch"):
        lines += [
            t["coverage_before_first_epoch"].format(
                steps=f(c["optimizer_steps"]),
                per_epoch=f(c["steps_per_epoch"]),
                losses=c["losses_logged"],
                points=t[plural(c["losses_logged"], "point", "points")],
            ),
            "",
        ]
    elif c["partial"]:
        why = (
            t["coverage_checkpoint"] if report["stop"].get("reason") == "checkpoint" else t["coverage_other"]
        )
        lines += [
            t["coverage"].format(
                step=f(c["up_to_step"]), epoch=f(c["up_to_epoch"]), max=f(c["max_steps"]), why=why
            ),
            "",
        ]
    lines += _render_general(report["general"], t, f, language)
    lines += _render_loss(report["loss"], report["evidence_z"], t, f)
    if report["memory"] is not None:
        lines += _render_memory(report["memory"], t, f)
    if report["phases"] is not None:
        lines += _render_phases(report["phases"], report["evidence_z"], t, f)
    if report["nonfinite"]:
        lines += [f"## {t['nonfinite']}", ""]
        for name, entry in report["nonfinite"]["series"].items():
            lines.append(
                "- "
                + t["nonfinite_line"].format(
                    series=t[f"nonfinite_{name}"],
                    kind="NaN" if entry["kind"] == "nan" else "inf",
                    step=entry["first_step"],
                    epoch=f(entry["first_epoch"]),
                    count=entry["count"],
                    of=entry["of"],
                )
            )
        lines.append("")
    if report["grad_norm"] is not None:
        g = report["grad_norm"]
        lines += [f"## {t['grad_norm']}", ""]
        lines.append(
            "- " + t["grad_peak"].format(peak=f(g["peak"]), epoch=g["peak_epoch"], step=g["peak_step"])
        )
        if g["epochs"] >= 2 and not g.get("settling_judged", True):
            lines.append("- " + counted(t, "grad_too_few", g["values_logged"]).format(n=g["values_logged"]))
        elif g["epochs"] >= 2:
            key = "grad_settled" if g["settled_from_epoch"] is not None else "grad_not_settled"
            lines.append(
                "- "
                + t[key].format(
                    level=f(g["settled_level"]),
                    tail=f(g["tail_pct"]),
                    epoch=g["settled_from_epoch"],
                    factor=f(g["settle_factor"]),
                )
            )
        lines += ["- " + t["grad_last"].format(value=f(g["last"])), ""]
    if report["learning_rate"] is not None:
        lr = report["learning_rate"]
        lines += [f"## {t['lr']}", ""]
        lines.append(
            "- " + t["lr_peak"].format(peak=f(lr["peak"]), epoch=lr["peak_epoch"], step=lr["peak_step"])
        )
        if lr["shape"] != "too_few":
            lines.append(
                "- "
                + t["lr_first_last"].format(
                    first=f(lr["first"]), last=f(lr["last"]), pct=f(lr["last_pct_of_peak"])
                )
            )
        shape = t[f"shape_{lr['shape']}"].format(warmup=f(lr["warmup_pct"]))
        lines.append("- " + t["lr_shape"].format(shape=shape))
        if lr.get("phase_aware"):
            lines.append("- " + _render_phase_aware_lr(lr["phase_aware"], t, f))
        lines.append("")
    if report["validation"] is not None:
        lines += _render_validation(report["validation"], report, t, f)
    lines += _render_stop(report["stop"], t, f)
    if report["figures"]:
        lines += [f"## {t['figures']}", ""]
        for name, filename in report["figures"].items():
            lines += [f"![{t[f'fig_{name}']}]({filename})", "", f"*{t[f'fig_{name}']}*", ""]
    lines += [f"## {t['recommendations']}", ""]
    for item in report["recommendations"]:
        lines.append("- " + _render_recommendation(item, report, t, f))
    if not report["recommendations"]:
        lines.append("- " + t["no_recommendations"])
    lines.append("")
    if report["notes"]:
        lines += [f"## {t['notes']}", ""]
        for note in report["notes"]:
            params = {key: value for key, value in note.items() if key != "key"}
            if "unit" in params:
                params["unit"] = t[f"unit_{params['unit']}"]
            lines.append("- " + counted(t, f"note_{note['key']}", note.get("points")).format(**params))
        lines.append("")
    return "\n".join(lines)


def _render_general(g: dict[str, Any], t: dict[str, str], f, language: str) -> list[str]:
    if (
        g["complete_epochs"] is not None
        and g["epochs_run"] is not None
        and g["epochs_run"] != g["complete_epochs"]
    ):
        epochs = counted(t, "epochs_partial", g["complete_epochs"]).format(
            run=f(g["epochs_run"]),
            max=f(g["max_epochs"]),
            complete=g["complete_epochs"],
            epoch=g["complete_epochs"] + 1,
            fraction=f(round(g["epochs_run"] - int(g["epochs_run"]), 2)),
        )
    elif g["max_epochs"] is None:
        epochs = f(g["epochs_run"])
    else:
        epochs = t["epochs_value"].format(run=f(g["epochs_run"]), max=f(g["max_epochs"]))

    def known(value: Any, unknown: str) -> str:
        # "unknown" agrees with the row's noun in Spanish: Precisión desconocida, Parámetros desconocidos.
        return t[unknown] if value is None else f(value)

    steps = known(g["optimizer_steps"], "unknown_mp")
    rows = [
        (t["base_model"], f(g["base_model"])),
        (t["parameters"], fmt_count(g["total_parameters"], language).replace(t["unknown"], t["unknown_mp"])),
        (
            t["trainable"],
            t["trainable_value"].format(
                count=fmt_count(g["trainable_parameters"], language), pct=f(g["trainable_pct"])
            )
            if g["trainable_parameters"] is not None
            else t["unknown_mp"],
        ),
        (t["hardware"], _render_hardware(g["hardware"], t, f)),
        (t["precision"], known(g["precision"], "unknown_f")),
        (t["quantization"], known(g["quantization"], "unknown_f")),
        (t["epochs"], epochs),
        (t["steps"], steps + (f" / max_steps {g['max_steps']}" if g["max_steps"] else "")),
    ]
    if g["started_at"] is not None:
        rows.append((t["started"], f"{g['started_at']} / {f(g['ended_at'])}"))
    if g["duration_parts"] is not None:
        parts = [
            t[unit if count != 1 else unit[:-1]].format(n=count)
            for unit, count in g["duration_parts"].items()
            if count
        ] or [t["seconds"].format(n=0)]
        rows.append(
            (
                t["duration"],
                counted(t, "duration_value", g["duration_minutes"]).format(
                    parts=", ".join(parts), minutes=f(g["duration_minutes"])
                ),
            )
        )
    else:
        rows.append((t["duration"], t["unknown_f"]))
    if g["trainer_reported_mean_loss"] is not None:
        rows.append((t["reported_mean_loss"], f(g["trainer_reported_mean_loss"])))
    lines = [f"## {t['general']}", "", f"| {t['item']} | {t['value']} |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    return lines + [""]


def _render_loss(loss: dict[str, Any] | None, z: float, t: dict[str, str], f) -> list[str]:
    lines = [f"## {t['loss']}", ""]
    if loss is None:
        return lines + ["- " + t["loss_none"], ""]
    for key in ("first", "last", "last_finite"):
        point = loss[key]
        if point is not None:
            value = f(point["value"]) if point["value"] is not None else "NaN/inf"
            lines.append(
                "- " + t[f"loss_{key}"].format(value=value, step=point["step"], epoch=f(point["epoch"]))
            )
    smoothed = loss["smoothed_final"]
    if smoothed is not None and smoothed["points"] > 1:
        lines.append(
            "- "
            + t["loss_smoothed"].format(
                value=f(smoothed["value"]),
                n=smoothed["points"],
                points=t[plural(smoothed["points"], "point", "points")],
                a=smoothed["first_step"],
                b=smoothed["last_step"],
            )
        )
    if loss["reduction_pct"] is not None and loss["points"] > 1:
        # The smoothed final loss is named only where it is a median of several points.
        key = "loss_reduction" if smoothed is not None and smoothed["points"] > 1 else "loss_reduction_last"
        lines.append(
            "- " + t[key].format(pct=f(loss["reduction_pct"]), spct=f(loss["smoothed_reduction_pct"]))
        )
    trend = loss["trend"]
    n = trend["edge_points"]
    key = f"trend_{trend['kind']}" + ("_first" if trend.get("from_first") else "")
    count = loss["points"] if trend["kind"] == "too_few_points" else n
    lines.append(
        "- "
        + counted(t, key, count).format(
            last=counted(t, "last_median", n).format(n=n),
            first=counted(t, "first_median", n).format(n=n),
            first_value=f(trend.get("first")),
            head=f(trend["head"]),
            tail=f(trend["tail"]),
            change=f(trend["change_pct"]),
            z=f(trend.get("standard_errors_abs")),
            noise=f(trend["noise_pct"]),
            se=f(trend["standard_error_pct"]),
            need=f(z),
            count=loss["points"],
        )
    )
    if loss["partial_epoch"]:
        p = loss["partial_epoch"]
        lines.append(
            "- "
            + counted(t, "partial_epoch", p["points"]).format(
                epoch=p["epoch"], fraction=f(p["fraction"]), count=p["points"]
            )
        )
    lines.append("")
    if loss["epoch_means"]:
        lines += [f"### {t['epoch_means']}", ""]
        if loss["epoch_means"][0].get("points") is not None:  # the mean of the logged points: how many
            lines += [f"| {t['epoch_col']} | {t['mean_col']} | {t['points_col']} |", "|---|---|---|"]
            lines += [f"| {r['epoch']} | {f(r['loss'])} | {r['points']} |" for r in loss["epoch_means"]]
        else:
            lines += [f"| {t['epoch_col']} | {t['mean_col']} |", "|---|---|"]
            lines += [f"| {row['epoch']} | {f(row['loss'])} |" for row in loss["epoch_means"]]
        lines.append("")
    return lines


def _render_hardware(hardware: dict[str, Any] | None, t: dict[str, str], f) -> str:
    if not hardware:
        return t["unknown"]
    if hardware.get("kind") == "cuda":
        text = t["gpu"].format(
            name=hardware.get("name"),
            memory=f(hardware.get("memory_mb")),
            sms=f(hardware.get("multiprocessors")),
        )
        if hardware.get("cuda_cores"):
            text += t["cuda_cores"].format(cores=hardware["cuda_cores"])
        return text
    return t["cpu"].format(name=f(hardware.get("name")), cores=f(hardware.get("cores")))


def _render_memory(m: dict[str, Any], t: dict[str, str], f) -> list[str]:
    lines = [
        f"## {t['memory']}",
        "",
        t["memory_device"].format(device=m["device"], budget=f(m["budget_mb"])),
        "",
    ]
    lines += [f"| {t['memory_kind']} | {t['memory_size']} | {t['memory_pct']} |", "|---|---|---|"]
    lines += [
        f"| {t['mem_' + row['name']]} | {f(row['mb'])} | {f(row['percent_of_budget'])} |" for row in m["rows"]
    ]
    lines.append("")
    if m["peak_mb"] is not None and m["budget_mb"]:
        lines.append(
            t["memory_peak"].format(
                peak=f(m["peak_mb"]), pct=f(m["peak_percent_of_budget"]), headroom=f(m["headroom_mb"])
            )
        )
    if m["out_of_memory"]:
        lines.append(t["memory_oom"])
        at = m.get("out_of_memory_at")
        if at and at["step"] is not None:
            lines.append(
                counted(t, "memory_oom_at", at["step"]).format(step=at["step"], epoch=f(at["epoch"]))
            )
        if at and at["estimated_peak_mb"] is not None:
            terms = ", ".join(f"{term['name']} {f(term['mb'])} MB" for term in at["largest_terms"])
            lines.append(
                t["memory_oom_planner"].format(
                    estimate=f(at["estimated_peak_mb"]), phase=f(at["estimated_peak_phase"]), terms=terms
                )
            )
    if m["planner"]:
        p = m["planner"]
        lines.append(
            t["memory_planner"].format(
                estimate=f(p["estimated_peak_mb"]), batch=p["micro_batch"], largest=p["max_micro_batch"]
            )
        )
    return lines + [""]


def _render_phases(p: dict[str, Any], z: float, t: dict[str, str], f) -> list[str]:
    units = t[f"unit_{p['unit']}s"]
    checked_steps = p["series"] == "checked" and p["unit"] == "step"
    lines = [f"## {t['phases']}", ""]
    if p["method"] == "detected":
        o = p["options"]
        if p["series"] == "checked":
            n = p["check_every_n_steps"]
            every = t["checked_every_step"] if n == 1 else t["checked_every_n_steps"].format(n=n)
            series = t[f"series_checked_{p['unit']}"].format(monitor=p["monitor"], every=every)
        else:
            series = t[f"series_{p['series']}"]
        lines.append(
            t["phases_detected"].format(
                series=series,
                window=o["window"],
                units=t["unit_checks"] if checked_steps else units,
                ft=f(o["fine_tuning_below"]),
                st=f(o["stabilization_below"]),
                z=f(z),
            )
        )
        if p.get("window_from") == "length" and p["points"] >= p["options"]["window"]:
            low, high = p["length_window_bounds"]
            lines.append(t["window_from_length"].format(points=p["points"], low=low, high=high))
    else:
        lines.append(t["phases_given"].format(boundaries=", ".join(str(b) for b in p["boundaries"])))
    if p["online_boundaries"]:
        lines.append(t["phases_online"].format(boundaries=", ".join(str(b) for b in p["online_boundaries"])))
    elif p["online_boundaries"] is not None:
        lines.append(t["phases_online_none"])
    lines.append("")
    at = t[f"at_{p['unit']}"]  # "en la época 1", "en el paso 25": the article agrees with the unit
    span = {
        "start": f(p["start_loss"]),
        "end": f(p["end_loss"]),
        "at_first": at.format(n=p["first_position"]),
        "at_last": at.format(n=p["last_position"]),
    }
    if p["total_reduction_pct"] is not None and p["points"] > 1:
        if p["total_reduction_pct"] >= 0:
            lines.append("- " + t["total_reduction"].format(pct=f(p["total_reduction_pct"]), **span))
        else:
            lines.append("- " + t["total_rise"].format(pct=f(abs(p["total_reduction_pct"])), **span))
    if p["verdict"] != "phases":
        lines.append("- " + t[f"verdict_{p['verdict']}"])
        if p.get("chance_classes"):
            lines.append("- " + t["chance"].format(level=f(p["flat_level"]), k=p["chance_classes"]))
        return lines + [""]
    lines.append("")
    if p.get("began_after_last"):
        lines += [
            t["phase_began_at_end"].format(
                name=t[f"phase_{p['began_after_last']}"],
                after=t[f"after_last_{p['unit']}"].format(n=p["last_position"]),
            ),
            "",
        ]
    for phase in p["phases"]:
        name = t[f"phase_{phase['name']}"]
        if phase.get("just_begun"):
            after = t[f"after_{p['unit']}"].format(n=p["boundaries"][phase["number"] - 2])
            lines += [
                counted(
                    t,
                    "phase_just_begun_epoch" if p["unit"] == "epoch" else "phase_just_begun",
                    phase["points"],
                ).format(name=name, after=after, count=phase["points"], window=p["options"]["window"]),
                "",
            ]
            continue
        lines += [
            "### "
            + t["phase_heading"].format(
                number=phase["number"], name=name, units=units, first=phase["first"], last=phase["last"]
            ),
            "",
            "- " + t["start_loss"].format(value=f(phase["start_loss"])),
            "- " + t["end_loss"].format(value=f(phase["end_loss"])),
            "- " + t["improvement"].format(value=f(phase["improvement_pct"])),
        ]
        if phase["share_of_total_reduction_pct"] is not None:
            lines.append("- " + t["share"].format(value=f(phase["share_of_total_reduction_pct"])))
        elif (phase["improvement_pct"] or 0) < 0:
            lines.append("- " + t["phase_rose"])
        points_key = (
            "phase_points_checked"
            if checked_steps
            else "phase_points_step"
            if p["unit"] == "step"
            else "phase_points"
        )
        lines += [
            "- "
            + t[points_key].format(
                Units=units.capitalize(), count=phase["points"], pct=f(phase["points_share_pct"])
            ),
            "",
        ]
    return lines


def _render_phase_aware_lr(phase: dict[str, Any], t: dict[str, str], f) -> str:
    """The learning-rate section's line on what PhaseAwareLR did (run.json)."""

    def epochs_of(count: Any) -> str:  # "1.06 epochs", "1 epoch"
        return f"{f(count)} {t[plural(count, 'unit_epoch', 'unit_epochs')]}"

    def steps(n: Any, epochs: Any) -> str:
        if epochs is None:
            return counted(t, "lr_steps", n).format(n=n)
        return counted(t, "lr_steps_epochs", n).format(n=n, epochs=epochs_of(epochs))

    if phase["outcome"] == "not_reached":
        return t["lr_phase_not_reached"] + "."
    at_epoch = (
        t["lr_phase_epoch"].format(epochs=epochs_of(phase["step_epochs"])) if phase["step_epochs"] else ""
    )
    fields = {
        "step": phase["step"],
        "at_epoch": at_epoch,
        "start": f(phase["start_lr"]),
        "floor": f(phase["floor_lr"]),
        "end": phase["ends_at_step"],
        "left": steps(phase["steps_left_before"], phase["steps_left_epochs"]),
    }
    if phase["outcome"] != "shortened":
        return t[f"lr_phase_{phase['outcome']}"].format(**fields) + "."
    line = t["lr_phase_shortened"].format(decay=steps(phase["decay_steps"], phase["decay_epochs"]), **fields)
    if phase["logged_at_floor_from_step"] is not None:
        line += t["lr_phase_logged_floor"].format(step=phase["logged_at_floor_from_step"])
    return line + "."


def _render_validation(v: dict[str, Any], report: dict[str, Any], t: dict[str, str], f) -> list[str]:
    lines = [f"## {t['validation']}", ""]
    val = v["val_loss"]
    if val is not None and val.get("best") is not None:
        fields = {k: f(value) for k, value in val.items() if not isinstance(value, dict)}
        fields["n"] = val["evaluations"]
        fields["evaluations"] = t[plural(val["evaluations"], "evaluation", "evaluations")]
        fields["key"] = val["key"]
        lines.append("- " + counted(t, "val_loss", val["evaluations"]).format(**fields))
        if val["overfitting"]:
            o = val["overfitting"]
            lines.append(
                "- "
                + counted(t, "overfitting", o.get("train_points")).format(
                    n=o.get("train_points"),
                    step=o["from_step"],
                    epoch=f(o["from_epoch"]),
                    best=f(o["best"]),
                    last=f(o["last"]),
                    rise=f(o["rise_pct"]),
                    train_best=f(o["train_at_best"]),
                    train_last=f(o["train_last"]),
                    fall=f(o["train_fall_pct"]),
                )
            )
        elif val["rising"]:
            r = val["rising"]
            lines.append(
                "- " + t["val_rising"].format(step=r["from_step"], rise=f(r["rise_pct"]), last=f(r["last"]))
            )
        elif val["evaluations"] > 1 and val["rise_after_best_pct"]:
            lines.append(
                "- "
                + t["val_after_best"].format(
                    rise=f(val["rise_after_best_pct"]),
                    threshold=f(report["settings"]["overfitting_rise_pct"]),
                )
            )
        lines.append("")
    a = v["answer_accuracy"]
    if a is not None:
        lines += [f"### {t['accuracy']}", ""]
        first_key = "acc_first_before" if a["first_epoch"] == 0 else "acc_first"
        lines.append("- " + t[first_key].format(value=f(a["first"]), epoch=a["first_epoch"]))
        lines.append("- " + t["acc_best"].format(value=f(a["best"]), epoch=a["best_epoch"]))
        lines.append("- " + t["acc_last"].format(value=f(a["last"]), epoch=a["last_epoch"]))
        lines.append(
            "- "
            + (
                t["acc_trend_flat_equal"]
                if a["trend"] == "flat" and a["recent_spread_points"] == 0
                else counted(t, f"acc_trend_{a['trend']}", a["recent_spread_points"])
            ).format(
                previous=f(a["previous_pct"]),
                last=f(a["last"]),
                n=a["recent_evaluations"],
                spread=f(a["recent_spread_points"]),
            )
        )
        lines += _render_calculator(a.get("calculator"), t, f)
        lines.append("")
    groups = v.get("metric_groups")
    grouped = (
        {f"{groups['prefix']}{g}_{m}" for g in groups["groups"] for m in groups["measures"]}
        if groups
        else set()
    )
    single = [m for m in v["other_metrics"] if m["name"] not in grouped]
    if single:
        lines += [
            f"### {t['other_metrics']}",
            "",
            f"| {t['metric']} | {t['evaluations'].capitalize()} | {t['first_col']} | {t['last_col']} | "
            f"{t['lowest_col']} | {t['highest_col']} |",
            "|---|---|---|---|---|---|",
        ]
        for m in single:
            lines.append(
                f"| {m['name']} | {m['evaluations']} | {f(m['first'])} ({m['first_step']}) | {f(m['last'])} "
                f"({m['last_step']}) | {f(m['lowest'])} ({m['lowest_step']}) | {f(m['highest'])} ({m['highest_step']}) |"
            )
        lines.append("")
    if groups:
        by_name = {m["name"]: m for m in v["other_metrics"]}
        final_step = max(by_name[name]["last_step"] for name in grouped)
        lines += [
            f"### {t['grouped_metrics']}",
            "",
            t["grouped_metrics_intro"].format(
                count=groups["group_count"],
                pattern=f"{groups['prefix']}<{t['group_col'].lower()}>_<{'|'.join(groups['measures'])}>",
            ),
            "",
            f"| {t['group_col']} | {t['evaluations'].capitalize()} | "
            + " | ".join(groups["measures"])
            + " |",
            "|---|---|" + "---|" * len(groups["measures"]),
        ]

        def cell(m: dict[str, Any]) -> str:
            if m["lowest"] == m["highest"]:
                return f(m["last"])
            return f"{f(m['last'])} ({f(m['lowest'])}–{f(m['highest'])})"

        for group in groups["groups"]:
            metrics = [by_name[f"{groups['prefix']}{group}_{m}"] for m in groups["measures"]]
            evaluations = str(metrics[0]["evaluations"])
            if metrics[0]["last_step"] != final_step:  # logged only at some evaluations
                evaluations += " " + t["last_at_step"].format(step=metrics[0]["last_step"])
            cells = [evaluations] + [cell(m) for m in metrics]
            lines.append(f"| {group} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _render_calculator(calculator: dict[str, Any] | None, t: dict[str, str], f) -> list[str]:
    """The accuracy section's line on calculator-assisted decoding; none when the run does not say."""
    if calculator is None:
        return []
    if not calculator["enabled"]:
        return ["- " + t["acc_calculator_off"]]
    line = t["acc_calculator_on"]
    calls = calculator["last_calls"]
    if calls is not None:
        changed = counted(t, "acc_calculator_changed", calculator["last_changed"]).format(
            changed=f(calculator["last_changed"])
        )
        line += counted(t, "acc_calculator_counts", calls).format(
            epoch=calculator["last_epoch"], calls=calls, changed=changed
        )
    return ["- " + line]


def _render_stop(stop: dict[str, Any], t: dict[str, str], f) -> list[str]:
    reason = stop.get("reason", "unknown")
    if reason == "early_stopping" and "patience" in stop:
        reason = "early_stopping_trainer"
    template = counted(t, f"stop_{reason}", stop.get("patience_counter")) if f"stop_{reason}" in t else None
    template = template or t["stop_unknown"]
    metric = stop.get("metric")
    fields = {
        "epoch": f(stop.get("epoch")),
        "step": f(stop.get("step")),
        "max_steps": f(stop.get("max_steps")),
        "exception": stop.get("exception", t["unknown"]),
        "callback": stop.get("callback", t["unknown"]),
        "patience": f(stop.get("patience")),
        "counter": f(stop.get("patience_counter")),
        "metric": t["es_metric"].format(
            metric=metric, best=f(stop.get("best_metric")), best_step=f(stop.get("best_step"))
        )
        if metric
        else t["es_metric_unknown"],
    }
    lines = [f"## {t['stop']}", "", "- " + template.format(**fields)]
    if stop.get("message"):
        lines.append("- " + t["stop_message"].format(message=stop["message"]))
    return lines + [""]


def _render_recommendation(item: dict[str, Any], report: dict[str, Any], t: dict[str, str], f) -> str:
    kind = item["kind"]
    tool = item.get("tool", "phi2tutor")
    if kind == "nonfinite":
        return t[f"rec_nonfinite_{tool}"].format(step=item["step"])
    if kind == "overfitting":
        epoch = item["checkpoint_epoch"] if item.get("checkpoint_epoch") is not None else item["from_epoch"]
        return t[f"rec_overfitting_{tool}"].format(step=item["from_step"], epoch=f(epoch))
    if kind == "val_rising":
        return t[f"rec_val_rising_{tool}"].format(step=item["from_step"])
    if kind == "no_learning":
        return t[f"rec_no_learning_{tool}"].format(level=f(item["level"]))
    if kind == "max_epochs":
        return t[f"rec_max_epochs_{tool}"].format(
            epoch=item["epoch"],
            at=f(item["loss_at_epoch"]),
            final=f(item["final_loss"]),
            remaining=f(item["remaining_reduction_pct"]),
            threshold=f(item["threshold_pct"]),
            saved=item["epochs_saved"],
            epochs=t[plural(item["epochs_saved"], "unit_epoch", "unit_epochs")],
            saved_pct=f(item["epochs_saved_pct"]),
        )
    if kind == "still_improving":
        return counted(t, f"rec_still_improving_{tool}", item["edge_points"]).format(
            unit=t[f"unit_{item['unit']}"],
            a=item["from_position"],
            b=item["to_position"],
            head=f(item["head"]),
            tail=f(item["tail"]),
            change=f(item["change_pct"]),
            n=item["edge_points"],
        )
    if kind == "larger_micro_batch":
        return t["rec_larger_micro_batch"].format(
            pct=f(item["peak_percent_of_budget"]),
            budget=f(item["budget_mb"]),
            headroom=f(item["headroom_mb"]),
            largest=item["max_micro_batch"],
            batch=item["micro_batch"],
        )
    if kind == "memory_tight":
        return t["rec_memory_tight"].format(
            pct=f(item["peak_percent_of_budget"]),
            threshold=f(item["threshold_pct"]),
            headroom=f(item["headroom_mb"]),
        )
    if kind == "out_of_memory":
        return t["rec_out_of_memory"].format(advice="; ".join(_ways_in_words(item["ways_to_fit"], t)))
    if kind == "accuracy_falling":
        return t["rec_accuracy_falling"].format(epoch=item["best_epoch"])
    if kind == "truncated":
        return counted(t, "rec_truncated", item["count"]).format(
            count=item["count"], max_length=f(item["max_length"])
        )
    return t[f"rec_{kind}"]
