"""apply_instruction: run an instruction over every row of a Spark DataFrame.

``apply_instruction`` builds the ``Request`` (what every answer depends on: the model version,
resolved here on the driver, the instruction and the answer settings) and the ``EngineConfig``
(how rows are run) from its keyword arguments; ``apply_request`` runs a request that is already
built (the summarize job builds one per run and runs it on every chunk). The Spark layer is
transport only: the pandas UDF (``dolly_spark.spark.udf``) ships rows to Python workers in
Arrow batches and hands them to the engine, which does the batching and parsing.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any, Mapping, Sequence

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql.types import StringType, StructType

from dolly_spark.inference.engines import EngineConfig
from dolly_spark.lifecycle.loader import stage_for_executors
from dolly_spark.lifecycle.registry import resolve_model
from dolly_spark.request import Request, build_request
from dolly_spark.spark.sessions import ARROW_BATCH_CONF
from dolly_spark.spark.structured import as_struct, describe, json_schema, structured_columns
from dolly_spark.spark.tables import require_columns
from dolly_spark.spark.udf import RESULT_SCHEMA, instruction_udf, prompt_count_udf

log = logging.getLogger(__name__)


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
    schema: str | StructType | Mapping[str, Any] | type | None = None,
    engine: str = "auto",
    gpu_memory_utilization: float = 0.85,
) -> DataFrame:
    """``df`` with one more column, ``output_col``: a struct per row with ``response``,
    ``finish_reason`` (stop | eos | length | error), ``error``, ``prompt_tokens``,
    ``completion_tokens``, ``truncated``, ``model_name``, ``model_version`` and ``engine`` (the
    engine that answered it).

    Structured answers:
    ``choices`` (labels such as ``["billing", "shipping", "other"]``) classify each row into
    exactly one of them by scoring, not generation: each label's tokens are scored after the
    row's prompt (the instruction gains a line listing the labels) and the struct gains
    ``label``, ``label_probability`` and ``label_probabilities`` (a map from every choice to its
    probability; they sum to 1). With ``choices`` alone nothing is generated and ``response`` is
    the label. ``schema`` (a DDL string such as ``"order_id STRING, refund_requested BOOLEAN"``, a
    StructType, a JSON Schema as a dict or its text, or a pydantic model class; a field's COMMENT
    or description tells the model what to put there, and an ``enum`` limits a STRING field to its
    values) constrains generation to
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

    How rows are run never enters a request's fingerprint: ``engine``, ``token_budget``,
    ``max_batch_rows``, ``min_length_ratio``, ``strategy``, ``dtype`` and
    ``gpu_memory_utilization`` make the ``EngineConfig``. ``engine`` is "vllm" (vLLM: on GPU
    executors many times faster), "hf" (the package's own transformers engine: faster on CPUs)
    or "auto" (the default: vLLM where an executor has a CUDA device and vLLM installed, "hf"
    elsewhere). Both give the same greedy answers on the same model and precision (the tests
    compare them row for row on the CPU); sampled answers differ between engines, and fp16 or
    bf16 arithmetic may differ between kernels.
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
    Raises ValueError before any Spark job when a column, the schema (naming the field) or the model is wrong.
    """
    instructions = _instruction_column(df, instruction)
    _check_columns(df, input_col, key_col, output_col)
    struct = as_struct(schema) if schema is not None else None
    config = EngineConfig(engine=engine, token_budget=token_budget, max_batch_rows=max_batch_rows,
                          min_length_ratio=min_length_ratio, strategy=strategy, dtype=dtype,
                          gpu_memory_utilization=gpu_memory_utilization)
    request = build_request(
        resolve_model(model_uri, prompt_format), instruction if isinstance(instruction, str) else None,
        require_input=bool(input_col) and require_input, max_new_tokens=max_new_tokens, temperature=temperature,
        top_p=top_p, top_k=top_k, seed=seed, max_input_tokens=max_input_tokens, on_overlong=on_overlong,
        repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
        choices=tuple(choices or ()), json_schema=json.dumps(json_schema(struct)) if struct is not None else None,
        output_type=describe(struct),
    )
    log.info("apply_instruction: %s resolved to %s", model_uri, request.model.uri)
    return apply_request(df, request, config, instructions=None if isinstance(instruction, str) else instructions,
                         input_col=input_col, key_col=key_col, output_col=output_col,
                         arrow_batch_size=arrow_batch_size, shared_model_dir=shared_model_dir)


def apply_request(df: DataFrame, request: Request, config: EngineConfig | None = None, *,
                  instructions: Column | None = None, input_col: str | None = None, key_col: str | None = None,
                  output_col: str = "response", arrow_batch_size: int | None = None,
                  shared_model_dir: str | None = None) -> DataFrame:
    """``df`` with ``output_col``, the result struct of ``request`` on every row (see
    ``apply_instruction``), run as ``config`` says. ``instructions`` is the string column of
    per-row instructions when ``request.instruction`` is None. Nothing is resolved again: every
    executor loads ``request.model``. Raises ValueError before any Spark job when a column or
    a setting is wrong."""
    config = config or EngineConfig()
    if request.model is None:
        raise ValueError("the request names no model; build it with build_request(resolve_model(uri), ...)")
    if (request.instruction is None) == (instructions is None):
        raise ValueError("give the instruction either in the request or as a column of per-row instructions")
    if request.require_input and not input_col:
        raise ValueError("the request requires an input on every row; name the input column (input_col)")
    _check_columns(df, input_col, key_col, output_col)
    if config.dtype is not None:
        from dolly_spark.inference.devices import parse_dtype

        parse_dtype(config.dtype)  # fail on the driver, not in every task
    if shared_model_dir:
        request = dataclasses.replace(request, model=stage_for_executors(request.model, shared_model_dir))
    log.info("running %s version %s (format %s, repetition_penalty %s, no_repeat_ngram_size %s) with engine %s",
             request.model.name, request.model.version, request.model.prompt_format or "auto",
             request.repetition_penalty, request.no_repeat_ngram_size, config.engine)
    if arrow_batch_size:
        # Session-wide by Spark's design: it is read when the action runs.
        df.sparkSession.conf.set(ARROW_BATCH_CONF, str(arrow_batch_size))
    inputs = _udf_inputs(request, instructions, input_col, key_col)
    answered = df.withColumn(output_col, instruction_udf(request, config)(*inputs))
    struct = StructType.fromJson(json.loads(request.output_type)) if request.output_type else None
    if not request.choices and struct is None:
        return answered
    # The UDF's fields, then the structured ones made from them; Spark evaluates the UDF once.
    raw = F.col(output_col)
    fields = [raw[field.name].alias(field.name) for field in RESULT_SCHEMA.fields]
    return answered.withColumn(output_col, F.struct(*fields, *structured_columns(raw, request.choices, struct)))


def count_prompts(df: DataFrame, request: Request, *, input_col: str | None = None, key_col: str | None = None,
                  output_col: str = "prompt") -> DataFrame:
    """``df`` with ``output_col``: each row's ``prompt_tokens``, ``truncated`` and refusal
    ``error`` under ``request``, as ``apply_request`` would count them on any engine, from the
    model's tokenizer alone (no weights loaded, nothing generated). For a dry run's estimate."""
    _check_columns(df, input_col, key_col, output_col)
    return df.withColumn(output_col, prompt_count_udf(request)(*_udf_inputs(request, None, input_col, key_col)))


def _udf_inputs(request: Request, instructions: Column | None, input_col: str | None,
                key_col: str | None) -> tuple[Column, Column, Column]:
    """The (instruction, input, key) columns the request's UDFs take."""
    instruction = instructions if instructions is not None else F.lit(request.instruction)
    context = F.col(input_col) if input_col else F.lit(None).cast("string")
    key = F.col(key_col).cast("string") if key_col else F.lit(None).cast("string")
    return instruction, context, key


def _check_columns(df: DataFrame, input_col: str | None, key_col: str | None, output_col: str) -> None:
    require_columns(df, {"input column": input_col} if input_col else {}, "the DataFrame")
    if key_col and key_col not in df.columns:
        raise ValueError(f"key column {key_col!r} is not a column of the DataFrame; its columns are {df.columns}")
    if output_col in df.columns:
        raise ValueError(f"output column {output_col!r} already exists; pass another output_col")


def _instruction_column(df: DataFrame, instruction: str | Column) -> Column:
    if isinstance(instruction, Column):
        dtype = df.select(instruction.alias("instruction")).schema[0].dataType
        if not isinstance(dtype, StringType):
            raise ValueError(f"the instruction column has type {dtype.simpleString()}, not string; cast it first")
        return instruction
    if isinstance(instruction, str) and instruction.strip():
        return F.lit(instruction)
    raise ValueError("instruction must be a non-empty string or a string Column")
