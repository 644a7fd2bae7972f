"""apply_instruction: run an instruction over every row of a Spark DataFrame.

The Spark layer is transport only: it resolves the model on the driver, ships rows to Python
workers in Arrow batches, and hands them to the engine, which does the batching and parsing.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from typing import Iterator, Sequence

import pandas as pd
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql.functions import pandas_udf
from pyspark.sql.types import BooleanType, IntegerType, StringType, StructField, StructType

from dolly_spark.models import stage_for_executors
from dolly_spark.registry import ModelSpec, registered_repetition, resolve_model
from dolly_spark.sessions import ARROW_BATCH_CONF
from dolly_spark.structured import as_struct, json_schema, result_fields, structured_columns, udf_fields
from dolly_spark.tables import require_columns

log = logging.getLogger(__name__)

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
    ]
)


def apply_instruction(
    df: DataFrame,
    instruction: str | Column,
    *,
    model_uri: str,
    input_col: str | None = None,
    output_col: str = "response",
    key_col: str | None = None,
    require_input: bool = True,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    prompt_format: str | None = None,
    token_budget: int = 16384,
    max_input_tokens: int = 4096,
    max_batch_rows: int = 64,
    min_length_ratio: float = 0.75,
    on_overlong: str = "truncate",
    strategy: str = "static",
    repetition_penalty: float | None = None,
    no_repeat_ngram_size: int | None = None,
    arrow_batch_size: int | None = None,
    dtype: str | None = None,
    shared_model_dir: str | None = None,
    choices: Sequence[str] | None = None,
    schema: str | StructType | None = None,
) -> DataFrame:
    """``df`` with one more column, ``output_col``: a struct per row with ``response``,
    ``finish_reason`` (stop | eos | length | error), ``error``, ``prompt_tokens``,
    ``completion_tokens``, ``truncated``, ``model_name`` and ``model_version``.

    Structured answers:
    ``choices`` (labels such as ``["billing", "shipping", "other"]``) classify each row into
    exactly one of them by scoring, not generation: each label's tokens are scored after the
    row's prompt (the instruction gains a line listing the labels) and the struct gains
    ``label``, ``label_probability`` and ``label_probabilities`` (a map from every choice to its
    probability; they sum to 1). With ``choices`` alone nothing is generated and ``response`` is
    the label. ``schema`` (a DDL string such as ``"order_id STRING, refund_requested BOOLEAN"``, or
    a StructType; a field's COMMENT tells the model what to put there) constrains generation to
    JSON with those fields (all present, nullable ones may be null) and the struct gains
    ``parsed``, that JSON typed as the schema says: ``F.col("response.parsed.order_id")``. A row
    whose JSON is not complete (cut off by ``max_new_tokens``) keeps its raw text in
    ``response``, gets a null ``parsed`` and an ``error`` that says why. Both may be given: each
    row is then scored and generated.

    ``instruction`` is one string for every row or a string Column (one instruction per row);
    ``input_col`` holds each row's context (the ``Input:`` of the Dolly prompt); a row whose input
    is null or blank gets an error, unless ``require_input=False`` (dolly-15k style data, where
    an empty context means none). ``model_uri`` is
    ``models:/name/3``, ``models:/name@champion``, ``models:/<model id>``, a local checkpoint or
    a hub id; a registry URI is resolved to one version here, on the driver, before anything
    runs. The prompt format comes from the registered model's metadata unless
    ``prompt_format`` is given. Sampling (``temperature`` > 0) is seeded per row from
    ``key_col`` (or the row's text), so a retried task reproduces its rows.

    ``max_input_tokens`` caps each row's prompt (template, instruction and input) below the
    model's context window; a longer input is cut from its end and flagged ``truncated``, or,
    with ``on_overlong="error"``, gets an error. ``token_budget`` bounds each micro-batch:
    rows x (longest prompt + ``max_new_tokens``) tokens, and a prompt never exceeds it either.

    ``repetition_penalty`` (> 1 discourages tokens already in the answer) and
    ``no_repeat_ngram_size`` (no n-gram twice in the answer) stop small models' loops; None takes the value
    registered with the model version (see ``registry.log_and_register``), else off.

    ``dtype`` ("float32", "bfloat16", "float16") overrides the device default (bf16 or fp16 on
    GPUs, fp32 on CPUs); bf16 on a CPU with AMX is several times faster than fp32, with
    slightly different greedy answers.

    ``shared_model_dir`` is for clusters whose executors cannot reach the model registry (Unity
    Catalog gives executors no registry credentials by default): the driver downloads the
    resolved version once into that directory, which every node must be able to read (a UC
    Volume such as ``/Volumes/main/default/models``, DBFS, a shared file system), and executors
    load it from there without calling the registry. Without it, each node downloads the version
    once into its own local model cache.

    Just the text: ``apply_instruction(df, ...).select("*", F.col("response.response").alias("text"))``.
    Raises ValueError before any Spark job when a column or the model is wrong.
    """
    from dolly_spark.engine import GenerationSettings

    instruction_column = _instruction_column(df, instruction)
    roles = {"input column": input_col} if input_col else {}
    require_columns(df, roles, "the DataFrame")
    if key_col and key_col not in df.columns:
        raise ValueError(f"key column {key_col!r} is not a column of the DataFrame; its columns are {df.columns}")
    if output_col in df.columns:
        raise ValueError(f"output column {output_col!r} already exists; pass another output_col")
    struct = as_struct(schema) if schema is not None else None
    settings = GenerationSettings(
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
        token_budget=token_budget, max_input_tokens=max_input_tokens, max_batch_rows=max_batch_rows,
        min_length_ratio=min_length_ratio,
        on_overlong=on_overlong, strategy=strategy,
        repetition_penalty=1.0 if repetition_penalty is None else repetition_penalty,
        no_repeat_ngram_size=no_repeat_ngram_size or 0,
        choices=tuple(choices or ()), json_schema=json.dumps(json_schema(struct)) if struct is not None else None,
    )
    spec = resolve_model(model_uri, prompt_format)
    settings = with_registered_defaults(settings, spec, repetition_penalty is None, no_repeat_ngram_size is None)
    if shared_model_dir:
        spec = stage_for_executors(spec, shared_model_dir)
    log.info("apply_instruction: %s resolved to %s (version %s, format %s, repetition_penalty %s, "
             "no_repeat_ngram_size %s)", model_uri, spec.uri, spec.version, spec.prompt_format or "auto",
             settings.repetition_penalty, settings.no_repeat_ngram_size)
    if arrow_batch_size:
        # Session-wide by Spark's design: it is read when the action runs.
        df.sparkSession.conf.set(ARROW_BATCH_CONF, str(arrow_batch_size))
    if dtype is not None:
        from dolly_spark.devices import parse_dtype

        parse_dtype(dtype)  # fail on the driver, not in every task
    generate = instruction_udf(spec, settings, require_input=bool(input_col) and require_input, dtype=dtype)
    context = F.col(input_col) if input_col else F.lit(None).cast("string")
    key = F.col(key_col).cast("string") if key_col else F.lit(None).cast("string")
    answered = df.withColumn(output_col, generate(instruction_column, context, key))
    if not settings.choices and struct is None:
        return answered
    # The UDF's fields, then the structured ones made from them; Spark evaluates the UDF once.
    raw = F.col(output_col)
    fields = [raw[field.name].alias(field.name) for field in RESULT_SCHEMA.fields]
    return answered.withColumn(output_col, F.struct(*fields, *structured_columns(raw, settings.choices, struct)))


def result_schema(choices: Sequence[str] | None = None, schema: str | StructType | None = None) -> StructType:
    """The struct ``apply_instruction`` gives each row for these ``choices`` and ``schema``."""
    struct = as_struct(schema) if schema is not None else None
    return StructType(RESULT_SCHEMA.fields + result_fields(choices or (), struct))


def with_registered_defaults(settings, spec: ModelSpec, penalty_unset: bool, ngram_unset: bool):
    """``settings`` with the repetition control registered with ``spec``'s version wherever the
    caller left it unset."""
    unset = {"repetition_penalty": penalty_unset, "no_repeat_ngram_size": ngram_unset}
    changes = {name: value for name, value in registered_repetition(spec).items() if unset[name]}
    return dataclasses.replace(settings, **changes)


def _instruction_column(df: DataFrame, instruction: str | Column) -> Column:
    if isinstance(instruction, Column):
        dtype = df.select(instruction.alias("instruction")).schema[0].dataType
        if not isinstance(dtype, StringType):
            raise ValueError(f"the instruction column has type {dtype.simpleString()}, not string; cast it first")
        return instruction
    if isinstance(instruction, str) and instruction.strip():
        return F.lit(instruction)
    raise ValueError("instruction must be a non-empty string or a string Column")


def task_gpu_index() -> int | None:
    """The GPU Spark assigned to this task, or None (local mode, CPU executors)."""
    from pyspark import TaskContext

    context = TaskContext.get()
    gpus = context.resources().get("gpu") if context is not None else None
    if gpus is None or not gpus.addresses:
        return None
    return int(gpus.addresses[0])


def results_frame(results, spec: ModelSpec, labels: bool = False) -> pd.DataFrame:
    """The engine's results as a pandas frame shaped like RESULT_SCHEMA, with ``labels`` the
    fields of ``structured.udf_fields`` after it."""
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
    if labels:
        frame["label"] = [r.label for r in results]
        frame["label_probability"] = [r.label_probability for r in results]
        frame["choice_probabilities"] = [r.choice_probabilities for r in results]
    return frame


def instruction_udf(spec: ModelSpec, settings, require_input: bool = False, dtype: str | None = None):
    """The pandas UDF (instruction, context, key) -> result struct for one resolved model.
    With ``require_input`` a row with a null or blank input gets an error result. Each executor
    keeps the model files in its own node's cache (see ``settings.model_cache_dir``)."""

    @pandas_udf(StructType(RESULT_SCHEMA.fields + udf_fields(settings.choices)))
    def generate(batches: Iterator[tuple[pd.Series, pd.Series, pd.Series]]) -> Iterator[pd.DataFrame]:
        from dolly_spark.models import forget_model, load_engine

        gpu_index = task_gpu_index()
        engine = load_engine(spec, settings, gpu_index, dtype=dtype)
        for instructions, contexts, keys in batches:
            try:
                results = engine.run(instructions.tolist(), contexts.tolist(), keys.tolist(),
                                     require_context=require_input)
            except Exception:
                # Not a row's problem (those come back as error results): the task fails and
                # Spark retries it. PySpark's worker exits after a failed task, but a host that
                # keeps the process must not hand the retry a model that may be what broke.
                forget_model(spec, gpu_index, dtype)
                raise
            yield results_frame(results, spec, labels=bool(settings.choices))

    return generate
