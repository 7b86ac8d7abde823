"""The data audit: what the training data holds before a GPU hour is spent on it. Duplicates, near-duplicates,
train/test contamination (shared 13-grams, the GPT-3 paper's check), token lengths against max_length, a
difficulty profile and calculator annotations, with recommendations computed from those numbers.

Pure analysis (no torch, no Lightning): it takes the rows and token lengths the data module produced, so the
audit describes exactly what fit trains on. ``phi2tutor data`` and fit (data.audit) call it.
"""

from __future__ import annotations

import json
import re
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DATA_REPORT_MD = "data_report.md"
DATA_REPORT_JSON = "data_report.json"
LENGTHS_PNG = "data_lengths.png"
CONTAMINATION_NGRAM = 13  # GPT-3 (Brown et al. 2020, appendix C) used 13-grams of normalised words
EXAMPLES_SHOWN = 5

_WORD = re.compile(r"[a-z0-9áéíóúüñ]+")
_NUMBER = re.compile(r"\d[\d,]*(?:\.\d+)?")
_ANNOTATION = re.compile(r"<<[^<>]*>>")


@dataclass
class SplitRows:
    """One split as the data module made it: the texts it trains or evaluates on and their token lengths.

    Attributes:
        questions: questions, as put into the prompt template.
        answers: target answers as read (calculator annotations still in; ``annotations_kept`` says whether
            training keeps them).
        prompt_tokens: tokens of each formatted prompt.
        answer_tokens: tokens of each answer as trained (with the EOS token), before truncation.
        origin: where the rows came from (a file, a hub split, the generator).
        skipped: rows left out by data.skip_invalid_rows, by reason.
        annotations: calculator annotations (``<<48/2=24>>``) in each answer as read; by default counted in
            ``answers``.
    """

    questions: list[str]
    answers: list[str]
    prompt_tokens: list[int]
    answer_tokens: list[int]
    origin: str = ""
    skipped: dict[str, int] = field(default_factory=dict)
    annotations: list[int] | None = None

    def annotation_counts(self) -> list[int]:
        if self.annotations is not None:
            return self.annotations
        return [len(_ANNOTATION.findall(answer)) for answer in self.answers]


def normalize_question(text: str) -> str:
    """Exact-duplicate key: the question with its white space folded."""
    return " ".join(text.split())


def near_duplicate_key(text: str) -> str:
    """Near-duplicate key: case folded, white space folded, every number replaced by '#'."""
    return " ".join(_NUMBER.sub("#", text.lower()).split())


def words(text: str) -> list[str]:
    """Lower-cased words without punctuation: the units of the 13-gram contamination check."""
    return _WORD.findall(text.lower())


def ngrams(text: str, n: int = CONTAMINATION_NGRAM) -> set[tuple[str, ...]]:
    """The word n-grams of a text; a text shorter than n words is one n-gram of all its words."""
    tokens = words(text)
    if len(tokens) < n:
        return {tuple(tokens)} if tokens else set()
    return {tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}


def percentile(values: list[int], share: float) -> int:
    """Nearest-rank percentile (share in 0-1) of integer values."""
    ordered = sorted(values)
    rank = max(1, round(share * len(ordered) + 0.5 - 1e-9))
    return ordered[min(rank, len(ordered)) - 1]


def length_summary(values: list[int]) -> dict[str, float] | None:
    if not values:
        return None
    return {
        "min": min(values),
        "median": statistics.median(values),
        "p95": percentile(values, 0.95),
        "max": max(values),
    }


def solution_steps(answer: str) -> int:
    """Lines of working before the final "#### N" line."""
    body = answer.split("####")[0]
    return sum(1 for line in body.splitlines() if line.strip())


def largest_number(text: str) -> float | None:
    numbers = []
    for match in _NUMBER.findall(_ANNOTATION.sub("", text)):
        try:
            numbers.append(float(match.replace(",", "")))
        except ValueError:
            continue
    return max(numbers) if numbers else None


def duplicate_groups(questions: list[str], key) -> list[list[int]]:
    """Groups (row indices, 0-based) of two or more questions with the same key."""
    groups: dict[str, list[int]] = defaultdict(list)
    for index, question in enumerate(questions):
        groups[key(question)].append(index)
    return [indices for indices in groups.values() if len(indices) > 1]


def _within_split(rows: SplitRows) -> dict[str, Any]:
    exact = duplicate_groups(rows.questions, normalize_question)
    near = duplicate_groups(rows.questions, near_duplicate_key)
    return {
        "exact_duplicate_groups": len(exact),
        # Rows that would go if every group kept one row.
        "exact_duplicate_rows": sum(len(g) - 1 for g in exact),
        "near_duplicate_groups": len(near),
        "near_duplicate_rows": sum(len(g) - 1 for g in near),
        "exact_examples": [rows.questions[g[0]] for g in exact[:EXAMPLES_SHOWN]],
        "near_examples": [[rows.questions[i] for i in g[:2]] for g in near[:EXAMPLES_SHOWN]],
    }


@dataclass(frozen=True)
class _TrainKeys:
    """The train questions' keys, built once and looked up by every held-out split."""

    exact: set[str]
    near: set[str]
    grams: set[tuple[str, ...]]

    @classmethod
    def of(cls, train: SplitRows) -> _TrainKeys:
        grams: set[tuple[str, ...]] = set()
        for question in train.questions:
            grams |= ngrams(question)
        return cls(
            {normalize_question(q) for q in train.questions},
            {near_duplicate_key(q) for q in train.questions},
            grams,
        )


def _across_splits(train: _TrainKeys, other: SplitRows) -> dict[str, Any]:
    exact = [q for q in other.questions if normalize_question(q) in train.exact]
    near = [q for q in other.questions if near_duplicate_key(q) in train.near]
    contaminated = [q for q in other.questions if ngrams(q) & train.grams]
    return {
        "rows": len(other.questions),
        "exact_in_train": len(exact),
        "near_in_train": len(near),
        "contaminated_13gram": len(contaminated),
        "exact_examples": exact[:EXAMPLES_SHOWN],
        "contaminated_examples": contaminated[:EXAMPLES_SHOWN],
    }


def _lengths(rows: SplitRows, max_length: int) -> dict[str, Any]:
    totals = [p + a for p, a in zip(rows.prompt_tokens, rows.answer_tokens)]
    return {
        "prompt_tokens": length_summary(rows.prompt_tokens),
        "answer_tokens": length_summary(rows.answer_tokens),
        "total_tokens": length_summary(totals),
        "truncated": sum(1 for t in totals if t > max_length),
        "prompt_too_long": sum(1 for p in rows.prompt_tokens if p >= max_length),
        "max_length_to_truncate_none": max(totals) if totals else None,
    }


def _difficulty(rows: SplitRows) -> dict[str, Any]:
    steps = [solution_steps(a) for a in rows.answers]
    largest = [
        n
        for n in (largest_number(q + "\n" + a) for q, a in zip(rows.questions, rows.answers))
        if n is not None
    ]
    counts = rows.annotation_counts()
    annotated = sum(1 for count in counts if count)
    return {
        "steps": length_summary(steps),
        "step_histogram": dict(sorted(Counter(steps).items())),
        "largest_number_median": statistics.median(largest) if largest else None,
        "largest_number_max": max(largest) if largest else None,
        "share_with_number_over_100_pct": _pct(sum(1 for n in largest if n > 100), len(rows.answers)),
        "share_with_number_over_1000_pct": _pct(sum(1 for n in largest if n > 1000), len(rows.answers)),
        "annotated_answers": annotated,
        "annotated_share_pct": _pct(annotated, len(rows.answers)),
        "annotations": sum(counts),
    }


def _pct(part: int, whole: int) -> float | None:
    return round(100.0 * part / whole, 2) if whole else None


def audit(splits: dict[str, SplitRows], max_length: int, annotations_kept: bool = False) -> dict[str, Any]:
    """Every number of the data report, by split, and the recommendations that follow from them."""
    result: dict[str, Any] = {"max_length": max_length, "annotations_kept": annotations_kept, "splits": {}}
    for name, rows in splits.items():
        result["splits"][name] = {
            "origin": rows.origin,
            "rows": len(rows.questions),
            "skipped": dict(rows.skipped),
            "duplicates": _within_split(rows),
            "lengths": _lengths(rows, max_length),
            "difficulty": _difficulty(rows),
        }
    if "train" in splits:
        train_keys = _TrainKeys.of(splits["train"])
        result["overlap_with_train"] = {
            name: _across_splits(train_keys, rows) for name, rows in splits.items() if name != "train"
        }
    result["recommendations"] = recommendations(result)
    return result


def recommendations(result: dict[str, Any]) -> list[dict[str, Any]]:
    """What to do, as (key, numbers) records; the wording is in render_markdown."""
    advice = []
    train = result["splits"].get("train")
    for name, split in result["splits"].items():
        lengths = split["lengths"]
        if lengths["truncated"]:
            advice.append(
                {
                    "key": "raise_max_length",
                    "split": name,
                    "truncated": lengths["truncated"],
                    "rows": split["rows"],
                    "max_length": result["max_length"],
                    "needed": lengths["max_length_to_truncate_none"],
                }
            )
        if split["duplicates"]["exact_duplicate_rows"]:
            advice.append(
                {
                    "key": "remove_duplicates",
                    "split": name,
                    "rows": split["duplicates"]["exact_duplicate_rows"],
                }
            )
    for name, overlap in result.get("overlap_with_train", {}).items():
        if overlap["exact_in_train"]:
            advice.append({"key": "exact_overlap", "split": name, "rows": overlap["exact_in_train"]})
        elif overlap["contaminated_13gram"]:
            advice.append({"key": "ngram_overlap", "split": name, "rows": overlap["contaminated_13gram"]})
    if train and train["rows"]:
        near_share = 100.0 * train["duplicates"]["near_duplicate_rows"] / train["rows"]
        if near_share >= 25:
            advice.append(
                {
                    "key": "templated",
                    "share_pct": round(near_share, 1),
                    "rows": train["duplicates"]["near_duplicate_rows"],
                }
            )
        steps = train["difficulty"]["steps"]
        if steps and steps["max"] <= 1:
            advice.append({"key": "one_step_only"})
        share = train["difficulty"]["annotated_share_pct"] or 0.0
        if share >= 50 and not result["annotations_kept"]:
            advice.append({"key": "annotations_dropped", "share_pct": share})
    return advice


# ---------------------------------------------------------------- wording
TEXT = {
    "en": {
        "title": "Data report",
        "intro": "What the data module gives fit, read the way fit reads it (max_length {max_length}).",
        "rows": "Rows",
        "split": "Split",
        "origin": "Source",
        "skipped": "Skipped",
        "none": "none",
        "duplicates": "Duplicates within a split",
        "exact": "exact duplicate questions",
        "near": "near-duplicates (case, white space and numbers ignored)",
        "dup_row": "{split}: {exact} {exact_word} in {groups} {group_word}; {near} {near_word} beyond the first of their group",
        "overlap": "Held-out splits against train",
        "overlap_row": "{split} ({rows} rows): {exact} also in train word for word, {near} near-duplicates of a train question, {ngram} share a {n}-gram with train (the GPT-3 contamination check)",
        "lengths": "Token lengths (prompt, answer with EOS, total)",
        "length_cols": "| Split | | min | median | p95 | max |",
        "prompt": "prompt",
        "answer": "answer",
        "total": "total",
        "truncated": "{split}: {truncated} of {rows} examples exceed max_length {max_length} and are truncated",
        "difficulty": "Difficulty profile",
        "steps_row": "{split}: solution steps median {median}, max {max}; largest number median {num_median}, max {num_max}; {over100}% of rows have a number over 100, {over1000}% over 1000",
        "annotated_row": "{split}: {annotated} of {rows} answers ({share}%) carry calculator annotations ({count} in all); training {kept} them",
        "kept": "keeps",
        "dropped": "removes",
        "recommendations": "Recommendations",
        "no_recommendations": "Nothing to fix: no truncation, no duplicates, no overlap with train.",
        "raise_max_length": "Raise data.max_length to {needed} to truncate none of the {split} examples ({truncated} of {rows} are truncated at {max_length}).",
        "remove_duplicates": "Remove {rows} exact duplicate {dup_row_word} from {split} (they weigh those problems more than the others).",
        "exact_overlap": "{rows} {split} {question_word} also {appear_verb} in train word for word: remove them from one side, or the {split} accuracy overstates the tutor.",
        "ngram_overlap": "{rows} {split} {question_word} {share_verb} a 13-gram with a train question: look at the examples above before trusting the {split} accuracy.",
        "templated": "{share_pct}% of the train rows are near-duplicates of another (the same text with other numbers): the set is templated; more varied problems would teach more than more rows of the same templates.",
        "one_step_only": "Every train answer is one step: add multi-step problems (synthetic.two_step_share) if the tutor must solve them.",
        "annotations_dropped": "{share_pct}% of the train answers carry calculator annotations, which training removes: set data.keep_calculator_annotations: true to train with them (calculator decoding can then check the arithmetic).",
        "examples": "examples",
        "histogram": "Token lengths",
        "words": {
            "exact": ("exact duplicate", "exact duplicates"),
            "group": ("group", "groups"),
            "near": ("near-duplicate", "near-duplicates"),
            "row": ("row", "rows"),
            "question": ("question", "questions"),
            "dup_row": ("row", "rows"),
            "share_verb": ("shares", "share"),
            "appear_verb": ("appears", "appear"),
        },
    },
    "es": {
        "title": "Informe de los datos",
        "intro": "Lo que el módulo de datos entrega a fit, leído como lo lee fit (max_length {max_length}).",
        "rows": "Filas",
        "split": "Partición",
        "origin": "Origen",
        "skipped": "Omitidas",
        "none": "ninguna",
        "duplicates": "Duplicados dentro de una partición",
        "exact": "preguntas duplicadas exactas",
        "near": "casi duplicados (sin contar mayúsculas, espacios ni números)",
        "dup_row": "{split}: {exact} {exact_word} en {groups} {group_word}; {near} {near_word} además del primero de su grupo",
        "overlap": "Particiones reservadas frente a train",
        "overlap_row": "{split} ({rows} filas): {exact} también en train palabra por palabra, {near} casi duplicados de una pregunta de train, {ngram} comparten un {n}-grama con train (la comprobación de contaminación de GPT-3)",
        "lengths": "Longitudes en tokens (prompt, respuesta con EOS, total)",
        "length_cols": "| Partición | | mín. | mediana | p95 | máx. |",
        "prompt": "prompt",
        "answer": "respuesta",
        "total": "total",
        "truncated": "{split}: {truncated} de {rows} ejemplos superan max_length {max_length} y se truncan",
        "difficulty": "Perfil de dificultad",
        "steps_row": "{split}: pasos de la solución mediana {median}, máx. {max}; mayor número mediana {num_median}, máx. {num_max}; el {over100}% de las filas tiene un número mayor que 100, el {over1000}% mayor que 1000",
        "annotated_row": "{split}: {annotated} de {rows} respuestas ({share}%) llevan anotaciones de calculadora ({count} en total); el entrenamiento las {kept}",
        "kept": "conserva",
        "dropped": "quita",
        "recommendations": "Recomendaciones",
        "no_recommendations": "Nada que corregir: sin truncado, sin duplicados, sin solapamiento con train.",
        "raise_max_length": "Suba data.max_length a {needed} para no truncar ningún ejemplo de {split} ({truncated} de {rows} se truncan a {max_length}).",
        "remove_duplicates": "Quite {rows} {dup_row_word} de {split} (pesan esos problemas más que los demás).",
        "exact_overlap": "{rows} {question_word} de {split} {appear_verb} también en train palabra por palabra: quítelas de un lado, o la exactitud en {split} sobrestima al tutor.",
        "ngram_overlap": "{rows} {question_word} de {split} {share_verb} un 13-grama con una pregunta de train: revise los ejemplos de arriba antes de fiarse de la exactitud en {split}.",
        "templated": "El {share_pct}% de las filas de train son casi duplicados de otra (el mismo texto con otros números): el conjunto sigue plantillas; problemas más variados enseñarían más que más filas de las mismas plantillas.",
        "one_step_only": "Todas las respuestas de train tienen un solo paso: añada problemas de varios pasos (synthetic.two_step_share) si el tutor debe resolverlos.",
        "annotations_dropped": "El {share_pct}% de las respuestas de train lleva anotaciones de calculadora, que el entrenamiento quita: ponga data.keep_calculator_annotations: true para entrenar con ellas (la decodificación con calculadora podrá comprobar la aritmética).",
        "examples": "ejemplos",
        "histogram": "Longitudes en tokens",
        "words": {
            "exact": ("duplicado exacto", "duplicados exactos"),
            "group": ("grupo", "grupos"),
            "near": ("casi duplicado", "casi duplicados"),
            "row": ("fila", "filas"),
            "question": ("pregunta", "preguntas"),
            "dup_row": ("fila duplicada exacta", "filas duplicadas exactas"),
            "share_verb": ("comparte", "comparten"),
            "appear_verb": ("aparece", "aparecen"),
        },
    },
}
LANGUAGES = tuple(TEXT)


def _word(language: str, name: str, count: int) -> str:
    singular, plural = TEXT[language]["words"][name]
    return singular if count == 1 else plural


def _number(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and value.is_integer():
        return f"{int(value):,}"
    if isinstance(value, float):
        return f"{value:,.2f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def render_markdown(result: dict[str, Any], language: str = "en", figure: str | None = None) -> str:
    t = TEXT[language]
    lines = [f"# {t['title']}", "", t["intro"].format(max_length=result["max_length"]), ""]
    lines += [
        f"## {t['rows']}",
        "",
        f"| {t['split']} | {t['rows']} | {t['skipped']} | {t['origin']} |",
        "|---|---|---|---|",
    ]
    for name, split in result["splits"].items():
        skipped = ", ".join(f"{reason}: {count}" for reason, count in split["skipped"].items()) or t["none"]
        lines.append(f"| {name} | {split['rows']:,} | {skipped} | {split['origin']} |")
    lines += ["", f"## {t['duplicates']}", ""]
    for name, split in result["splits"].items():
        d = split["duplicates"]
        lines.append(
            "- "
            + t["dup_row"].format(
                split=name,
                exact=d["exact_duplicate_rows"],
                exact_word=_word(language, "exact", d["exact_duplicate_rows"]),
                groups=d["exact_duplicate_groups"],
                group_word=_word(language, "group", d["exact_duplicate_groups"]),
                near=d["near_duplicate_rows"],
                near_word=_word(language, "near", d["near_duplicate_rows"]),
            )
        )
        for example in d["exact_examples"][:3]:
            lines.append(f'  - {t["exact"]}: "{example[:160]}"')
    if result.get("overlap_with_train"):
        lines += ["", f"## {t['overlap']}", ""]
        for name, overlap in result["overlap_with_train"].items():
            lines.append(
                "- "
                + t["overlap_row"].format(
                    split=name,
                    rows=overlap["rows"],
                    exact=overlap["exact_in_train"],
                    near=overlap["near_in_train"],
                    ngram=overlap["contaminated_13gram"],
                    n=CONTAMINATION_NGRAM,
                )
            )
            for example in overlap["contaminated_examples"][:3]:
                lines.append(f'  - "{example[:160]}"')
    lines += ["", f"## {t['lengths']}", "", t["length_cols"], "|---|---|---|---|---|---|"]
    for name, split in result["splits"].items():
        for part in ("prompt", "answer", "total"):
            summary = split["lengths"][f"{part}_tokens"]
            if summary:
                cells = " | ".join(_number(summary[k]) for k in ("min", "median", "p95", "max"))
                lines.append(f"| {name} | {t[part]} | {cells} |")
    lines.append("")
    for name, split in result["splits"].items():
        lengths = split["lengths"]
        lines.append(
            "- "
            + t["truncated"].format(
                split=name,
                truncated=_number(lengths["truncated"]),
                rows=_number(split["rows"]),
                max_length=result["max_length"],
            )
        )
    if figure:
        lines += ["", f"![{t['histogram']}]({figure})"]
    lines += ["", f"## {t['difficulty']}", ""]
    for name, split in result["splits"].items():
        d = split["difficulty"]
        steps = d["steps"] or {}
        lines.append(
            "- "
            + t["steps_row"].format(
                split=name,
                median=_number(steps.get("median")),
                max=_number(steps.get("max")),
                num_median=_number(d["largest_number_median"]),
                num_max=_number(d["largest_number_max"]),
                over100=_number(d["share_with_number_over_100_pct"]),
                over1000=_number(d["share_with_number_over_1000_pct"]),
            )
        )
        lines.append(
            "- "
            + t["annotated_row"].format(
                split=name,
                annotated=_number(d["annotated_answers"]),
                rows=_number(split["rows"]),
                share=_number(d["annotated_share_pct"]),
                count=_number(d["annotations"]),
                kept=t["kept"] if result["annotations_kept"] else t["dropped"],
            )
        )
    lines += ["", f"## {t['recommendations']}", ""]
    if not result["recommendations"]:
        lines.append(f"- {t['no_recommendations']}")
    for advice in result["recommendations"]:
        fields = dict(advice)
        if "rows" in fields:
            fields["row_word"] = _word(language, "row", fields["rows"])
            fields["question_word"] = _word(language, "question", fields["rows"])
            fields["dup_row_word"] = _word(language, "dup_row", fields["rows"])
            fields["share_verb"] = _word(language, "share_verb", fields["rows"])
            fields["appear_verb"] = _word(language, "appear_verb", fields["rows"])
        lines.append("- " + t[advice["key"]].format(**fields))
    return "\n".join(lines) + "\n"


def plot_lengths(path: Path, splits: dict[str, SplitRows], max_length: int, language: str = "en") -> None:
    """Histogram of total tokens per example, by split, with max_length marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    totals = {name: [p + a for p, a in zip(s.prompt_tokens, s.answer_tokens)] for name, s in splits.items()}
    largest = max((max(v) for v in totals.values() if v), default=max_length)
    bins = list(range(0, max(largest, max_length) + 8, max(1, max(largest, max_length) // 40)))
    for name, values in totals.items():
        if values:
            axes.hist(values, bins=bins, alpha=0.5, label=f"{name} ({len(values):,})")
    axes.axvline(max_length, color="black", linestyle="--", label=f"max_length {max_length}")
    axes.set_xlabel(
        "tokens (prompt + answer + EOS)" if language == "en" else "tokens (prompt + respuesta + EOS)"
    )
    axes.set_ylabel("examples" if language == "en" else "ejemplos")
    axes.set_title(TEXT[language]["histogram"])
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)


def write_data_report(
    splits: dict[str, SplitRows],
    max_length: int,
    output_dir: str | Path,
    language: str = "en",
    annotations_kept: bool = False,
    figure: bool = True,
) -> dict[str, Any]:
    """Audit the splits and write data_report.md, data_report.json and the length histogram into output_dir."""
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    result = audit(splits, max_length, annotations_kept)
    if figure:
        plot_lengths(output / LENGTHS_PNG, splits, max_length, language)
    (output / DATA_REPORT_JSON).write_text(
        json.dumps(result, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    )
    (output / DATA_REPORT_MD).write_text(render_markdown(result, language, LENGTHS_PNG if figure else None))
    return result
