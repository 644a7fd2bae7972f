"""What a summarize run checks before any Spark job: the source table and its columns, the model
URI (resolved here, once per run, into the run's ``Request``), and a target table that can take
this run's results."""
from __future__ import annotations

import json

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql.types import StructField, StructType

from dolly_spark.inference.engines import EngineConfig
from dolly_spark.lifecycle.registry import resolve_model
from dolly_spark.request import Request, build_request, check_choices
from dolly_spark.spark.structured import STRUCTURED_FIELDS, as_struct, describe, json_schema
from dolly_spark.spark.tables import require_columns, require_table, table_exists
from dolly_spark.spark.udf import ADDED_RESULT_FIELDS, result_schema


def validate(spark: SparkSession, config) -> tuple[DataFrame, Request, EngineConfig]:
    """The source DataFrame, the run's request (its model resolved once, here) and its engine
    configuration, or a ValueError naming what is wrong. Reads only catalog metadata and the
    registry: no Spark job runs. ``config`` is a ``SummarizeConfig``."""
    source = require_table(spark, config.source_table, "source table")
    where = f"source table {config.source_table!r}"
    require_columns(source, {"text column": config.text_col}, where)
    if config.id_col not in source.columns:
        raise ValueError(f"id column {config.id_col!r} is not a column of {where}; its columns are {source.columns}")
    for name in ("max_attempts", "chunk_rows", "claim_timeout_minutes"):
        if getattr(config, name) <= 0:
            raise ValueError(f"{name} must be above 0, not {getattr(config, name)}")
    check_choices(tuple(config.choices or ()))
    results = result_schema(config.choices, config.schema)  # a schema without a JSON form fails here, named
    engine = EngineConfig(engine=config.engine, token_budget=config.token_budget)
    request = job_request(config, resolve_model(config.model_uri, config.prompt_format))
    if table_exists(spark, config.target_table):
        check_target(spark.read.table(config.target_table).schema, source.schema[config.id_col], results, config)
    return source, request, engine


def job_request(config, model) -> Request:
    """The request of a run of ``config`` with ``model`` (a resolved ``ModelSpec``): every ticket
    needs its text as input; the version's registered repetition control applies where the
    config leaves it unset."""
    struct = as_struct(config.schema) if config.schema else None
    return build_request(
        model, config.instruction, require_input=True, max_new_tokens=config.max_new_tokens,
        max_input_tokens=config.max_input_tokens, repetition_penalty=config.repetition_penalty,
        no_repeat_ngram_size=config.no_repeat_ngram_size, choices=tuple(config.choices or ()),
        json_schema=json.dumps(json_schema(struct)) if struct is not None else None, output_type=describe(struct))


def check_target(target: StructType, id_field: StructField, results: StructType, config) -> None:
    """Raise a ValueError naming ``config.target_table`` unless it holds the id and every result
    field with the types this run writes, and no structured-answer field this run would leave
    stale. Types are compared as Spark writes them out (``simpleString``): without nullability
    or comments, which a MERGE does not change."""
    where = f"target table {config.target_table!r}"
    fix = "point --target-table at a new table, or at one this job wrote with the same choices and schema"
    have = {field.name: field.dataType.simpleString() for field in target.fields}
    missing = sorted(name for name in [config.id_col, *results.names] if name not in have
                     and name not in ADDED_RESULT_FIELDS)
    if missing:
        raise ValueError(f"{where} exists but lacks columns {missing}; {fix}")
    wanted = [(field.name, field.dataType.simpleString()) for field in [id_field, *results.fields]
              if field.name in have]
    differ = [f"{name} is {have[name]}, this run writes {kind}" for name, kind in wanted if have[name] != kind]
    stale = sorted(name for name in STRUCTURED_FIELDS if name in have and name not in results.names)
    if differ:
        raise ValueError(f"{where} has other types than this run writes ({'; '.join(differ)}); {fix}")
    if stale:
        raise ValueError(f"{where} holds structured answers ({', '.join(stale)}) that this run, without the same "
                         f"choices and schema, would leave stale beside new answers; {fix}")
