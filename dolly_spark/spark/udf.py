"""The pandas UDF that runs a request on a Python worker: rows in Arrow batches to the engine, the
engine's results back as the result struct.

One engine per Python worker (``lifecycle.loader`` loads the model once per process), on the
GPU Spark assigned to the task. Only a row's own problems become error rows; anything else
fails the task, so Spark retries it.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import pandas as pd
from pyspark.sql.functions import pandas_udf
from pyspark.sql.types import BooleanType, IntegerType, StringType, StructField, StructType

from dolly_spark.inference.engines import EngineConfig, Rows
from dolly_spark.request import ModelSpec, Request
from dolly_spark.spark.structured import as_struct, result_fields, udf_fields

RESULT_SCHEMA = StructType(
    [
        StructField("response", StringType()),
        StructField("finish_reason", StringType()),
        StructField("error", StringType()),
        StructField("prompt_tokens", IntegerType()),
        StructField("completion_tokens", IntegerType()),
        StructField("truncated", BooleanType()),
        StructField("model_name", StringType()),
        StructField("model_version", StringType()),
        StructField("engine", StringType()),
        # With an error: whether the same request on the same input may give another result.
        StructField("retryable", BooleanType()),
    ]
)


# What a dry run learns of a row without running the model (``RowEncoder.encode_only``).
PROMPT_COUNT_SCHEMA = StructType(
    [
        StructField("prompt_tokens", IntegerType()),
        StructField("truncated", BooleanType()),
        StructField("error", StringType()),
    ]
)


# Result fields added after targets were first written: a target that lacks one gains it (null in
# the rows written before) at its next MERGE (``incremental.merge_results``).
ADDED_RESULT_FIELDS = ("engine", "retryable")


def result_schema(choices: Sequence[str] | None = None, schema: str | StructType | None = None) -> StructType:
    """The struct ``apply_instruction`` gives each row for these ``choices`` and ``schema``."""
    struct = as_struct(schema) if schema is not None else None
    return StructType(RESULT_SCHEMA.fields + result_fields(choices or (), struct))


def task_gpu_index() -> int | None:
    """The GPU Spark assigned to this task, or None (local mode, CPU executors)."""
    from pyspark import TaskContext

    context = TaskContext.get()
    gpus = context.resources().get("gpu") if context is not None else None
    if gpus is None or not gpus.addresses:
        return None
    return int(gpus.addresses[0])


def results_frame(results, spec: ModelSpec, engine_name: str, labels: bool = False) -> pd.DataFrame:
    """The engine's results as a pandas frame shaped like RESULT_SCHEMA (``engine_name``: the
    engine that gave them), with ``labels`` the fields of ``structured.udf_fields`` after it."""
    frame = pd.DataFrame(
        {
            "response": [r.response for r in results],
            "finish_reason": [r.finish_reason for r in results],
            "error": [r.error for r in results],
            "prompt_tokens": pd.array([r.prompt_tokens for r in results], dtype="int32"),
            "completion_tokens": pd.array([r.completion_tokens for r in results], dtype="int32"),
            "truncated": [bool(r.truncated) for r in results],
        }
    )
    frame["model_name"] = spec.name
    frame["model_version"] = spec.version
    frame["engine"] = engine_name
    frame["retryable"] = [r.retryable if r.error else None for r in results]
    if labels:
        frame["label"] = [r.label for r in results]
        frame["label_probability"] = [r.label_probability for r in results]
        frame["choice_probabilities"] = [r.choice_probabilities for r in results]
    return frame


def instruction_udf(request: Request, config: EngineConfig):
    """The pandas UDF (instruction, input, key) -> result struct for one resolved request. Each
    executor keeps the model files in its own node's cache (see ``paths.model_cache_dir``)."""

    @pandas_udf(StructType(RESULT_SCHEMA.fields + udf_fields(request.choices)))
    def generate(batches: Iterator[tuple[pd.Series, pd.Series, pd.Series]]) -> Iterator[pd.DataFrame]:
        from dolly_spark.lifecycle.loader import forget_model, load_engine

        gpu_index = task_gpu_index()
        engine = load_engine(request.model, config, gpu_index)
        for instructions, contexts, keys in batches:
            try:
                results = engine.run(Rows(instructions.tolist(), contexts.tolist(), keys.tolist()), request)
            except Exception:
                # Not a row's problem (those come back as error results): the task fails and
                # Spark retries it. PySpark's worker exits after a failed task, but a host that
                # keeps the process must not hand the retry a model that may be what broke.
                forget_model(request.model, config, gpu_index)
                raise
            yield results_frame(results, request.model, engine.name, labels=bool(request.choices))

    return generate


def prompt_count_udf(request: Request):
    """The pandas UDF (instruction, input, key) -> PROMPT_COUNT_SCHEMA: each row encoded as
    ``instruction_udf`` would encode it, by the model's tokenizer, with no weights loaded."""

    @pandas_udf(PROMPT_COUNT_SCHEMA)
    def count(batches: Iterator[tuple[pd.Series, pd.Series, pd.Series]]) -> Iterator[pd.DataFrame]:
        from dolly_spark.lifecycle.loader import load_row_encoder

        encoder = load_row_encoder(request.model)
        for instructions, contexts, keys in batches:
            results = encoder.encode_only(Rows(instructions.tolist(), contexts.tolist(), keys.tolist()), request)
            yield pd.DataFrame({
                "prompt_tokens": pd.array([r.prompt_tokens for r in results], dtype="int32"),
                "truncated": [bool(r.truncated) for r in results],
                "error": [r.error for r in results],
            })

    return count
