"""Prompt templates: how a question is shown to the model, in training and in generation alike."""

from __future__ import annotations

from phi2tutor.errors import Phi2TutorError

# Phi-2's recommended QA format (model card).
PHI2_QA_TEMPLATE = "Instruct: {question}\nOutput:"
# The same for a Spanish-speaking tutor.
PHI2_QA_TEMPLATE_ES = "Instrucción: {question}\nRespuesta:"


def format_prompt(template: str, question: str) -> str:
    """Fill ``template``'s ``{question}`` field; a template without it is a configuration error."""
    if "{question}" not in template:
        raise Phi2TutorError(
            f"The prompt template {template!r} has no {{question}} field. Set data.prompt_template "
            "(and model.prompt_template) to a text containing {question}, e.g. "
            f"{PHI2_QA_TEMPLATE!r}."
        )
    return template.replace("{question}", question.strip())
