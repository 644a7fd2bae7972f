"""A readable sample of a summarize run's target table, for the demo and the logs."""
from __future__ import annotations

from pyspark.sql import SparkSession


def preview(spark: SparkSession, config, rows: int = 10) -> str:
    """A readable sample of the target table: ticket, subject or text, then the summary, or for
    structured answers the label with its probability and the extracted fields."""
    target = spark.read.table(config.target_table)
    source = spark.read.table(config.source_table)
    title = "subject" if "subject" in source.columns else config.text_col
    joined = target.join(source.select(config.id_col, title), config.id_col, "left").orderBy(config.id_col)
    lines = []
    for row in joined.limit(rows).collect():
        lines.append(f"{row[config.id_col]}  {str(row[title])[:70]}\n    -> {_answer_text(row, config)}  "
                     f"({row['finish_reason']}, {row['completion_tokens']} tokens, "
                     f"{row['model_name']} v{row['model_version']})")
    return "\n".join(lines)


def _answer_text(row, config) -> str:
    if not (config.choices or config.schema):
        return row["response"] if row["error"] is None else f"[error: {row['error']}]"
    parts = []
    if config.choices and row["label"] is not None:
        parts.append(f"{row['label']} ({row['label_probability']:.2f})")
    if config.schema and row["parsed"] is not None:
        parts.append(", ".join(f"{name}={value}" for name, value in row["parsed"].asDict().items()))
    if row["error"] is not None:
        parts.append(f"[error: {row['error']}]")
    return " | ".join(parts)
