"""Structured answers through apply_instruction on local Spark, with the tiny random-weight model
(the strongest test of a constraint: it has no idea what to write): labels always from the set
with probabilities that sum to 1, JSON that always parses into the typed struct unless
max_new_tokens cut it, and such rows carrying an error."""
from __future__ import annotations

import re

import pytest
from pyspark.sql import functions as F
from pyspark.sql.types import BooleanType, DoubleType, IntegerType, MapType, StringType, StructType

from conftest import checked_schema_answer, tokenizer_corpus
from dolly_spark import apply_instruction
from dolly_spark.spark.structured import as_struct, json_schema
from dolly_spark.spark.udf import result_schema

LABELS = ["billing", "shipping", "technical", "account access", "ship"]  # "ship" is a prefix of "shipping"
# A random model writes digits without end: only bounded numbers (an INT's range) let it finish.
SCHEMA = "order_id STRING COMMENT 'the order number as written', product STRING, refund_requested BOOLEAN, quantity INT"
INSTRUCTION = "Triage this support ticket."


@pytest.fixture(scope="module")
def many_tickets(spark):
    texts = [text for text in tokenizer_corpus() if text.strip()][:198]
    rows = [(f"t{i:03d}", text[: 40 + (i * 37) % 600]) for i, text in enumerate(texts)]
    rows += [("t-null", None), ("t-blank", "  ")]
    assert len(rows) == 200
    return spark.createDataFrame(rows, "ticket_id STRING, body STRING").repartition(2)


def test_every_label_is_a_choice_and_probabilities_sum_to_one(spark, many_tickets, registered_tiny):
    name, _ = registered_tiny
    out = apply_instruction(many_tickets, INSTRUCTION, input_col="body", key_col="ticket_id",
                            model_uri=f"models:/{name}@champion", choices=LABELS)
    assert out.schema["response"].dataType == result_schema(choices=LABELS)
    # The UDF runs once per row: one Python evaluation in the plan, whatever reads its fields.
    assert out._jdf.queryExecution().executedPlan().toString().count("ArrowEvalPython") == 1
    rows = out.select("ticket_id", "response.*").collect()
    assert len(rows) == 200
    answered = [row for row in rows if row["error"] is None]
    assert len(answered) == 198 and {row["ticket_id"] for row in rows if row["error"]} == {"t-null", "t-blank"}
    for row in answered:
        probabilities = row["label_probabilities"]
        assert row["label"] in LABELS and row["response"] == row["label"]
        assert set(probabilities) == set(LABELS)
        assert abs(sum(probabilities.values()) - 1.0) < 1e-6
        assert row["label_probability"] == max(probabilities.values()) == probabilities[row["label"]]
        assert row["completion_tokens"] == 0 and row["finish_reason"] == "stop"
    # Scored per row: a random model favours short labels, but how much depends on the row.
    assert len({round(row["label_probability"], 6) for row in answered}) > 100
    for row in rows:
        if row["error"]:
            assert row["label"] is None and row["label_probabilities"] is None


@pytest.mark.parametrize("max_new_tokens", [24, 72])
def test_every_schema_answer_parses_into_the_typed_struct_unless_cut_off(spark, many_tickets, registered_tiny,
                                                                         max_new_tokens):
    name, _ = registered_tiny
    out = apply_instruction(many_tickets, INSTRUCTION, input_col="body", key_col="ticket_id",
                            model_uri=f"models:/{name}@champion", schema=SCHEMA, max_new_tokens=max_new_tokens)
    parsed_type = out.schema["response"].dataType["parsed"].dataType
    assert parsed_type == as_struct(SCHEMA)
    assert [(f.name, f.dataType) for f in parsed_type.fields] == [
        ("order_id", StringType()), ("product", StringType()), ("refund_requested", BooleanType()),
        ("quantity", IntegerType())]
    rows = out.select("ticket_id", "response.*", F.col("response.parsed.refund_requested").alias("refund")).collect()
    answered = [row for row in rows if row["ticket_id"] not in ("t-null", "t-blank")]
    complete = [row for row in answered if row["error"] is None]
    assert len(answered) == 198
    # 24 tokens cannot hold the four keys; 72 hold most answers this model writes.
    assert len(complete) == 0 if max_new_tokens == 24 else len(complete) > 150
    for row in answered:
        document = checked_schema_answer(row.asDict(recursive=True), max_new_tokens)
        if document is not None:
            assert set(document) == {"order_id", "product", "refund_requested", "quantity"}
            assert row["refund"] == document["refund_requested"]


def test_choices_and_schema_together_on_spark(spark, registered_tiny):
    name, _ = registered_tiny
    df = spark.createDataFrame([("a", "Order PB-90417 never arrived; refund me $20."), ("b", None)],
                               "ticket_id STRING, body STRING")
    schema = StructType.fromJson(as_struct("urgency STRING, refund_requested BOOLEAN").jsonValue())
    out = apply_instruction(df, INSTRUCTION, input_col="body", model_uri=f"models:/{name}@champion",
                            choices=["billing", "shipping"], schema=schema, max_new_tokens=64)
    rows = {row["ticket_id"]: row["response"] for row in out.collect()}
    assert rows["a"]["label"] in ("billing", "shipping")
    checked_schema_answer(rows["a"].asDict(recursive=True), max_new_tokens=64)
    assert rows["b"]["error"] and rows["b"]["label"] is None and rows["b"]["parsed"] is None
    assert isinstance(out.schema["response"].dataType["label_probabilities"].dataType, MapType)


URGENCIES = ["low", "medium", "high"]
# One schema in the three forms a user may write it: DDL cannot say that urgency is one of three
# values, so in DDL it is any string; the JSON Schema and the pydantic model say it.
ENUM_JSON_SCHEMA = {"type": "object", "properties": {
    "urgency": {"enum": URGENCIES}, "refund_requested": {"type": "boolean"}}, "required": ["urgency"]}


def test_an_enum_field_holds_only_its_values_and_every_form_gives_the_same_answers(spark, many_tickets,
                                                                                 registered_tiny):
    from typing import Literal, Optional

    from pydantic import BaseModel

    class Triage(BaseModel):
        urgency: Literal["low", "medium", "high"]
        refund_requested: Optional[bool] = None

    class FreeTriage(BaseModel):  # the DDL's equivalent
        urgency: str
        refund_requested: Optional[bool] = None

    name, _ = registered_tiny
    tickets = many_tickets.where("trim(body) != ''").orderBy("ticket_id").limit(10).coalesce(1).cache()

    def answers(schema):  # one job per form: each reuses the Python worker, its model loaded
        out = apply_instruction(tickets, INSTRUCTION, input_col="body", key_col="ticket_id", schema=schema,
                                model_uri=f"models:/{name}@champion", max_new_tokens=40)
        return out, [row.asDict(recursive=True) for row in out.orderBy("ticket_id").select("response.*").collect()]

    out, constrained = answers(Triage)
    assert out.schema["response"].dataType["parsed"].dataType.simpleString() == \
        "struct<urgency:string,refund_requested:boolean>"
    parsed = [row["parsed"] for row in constrained if row["parsed"] is not None]
    assert len(parsed) >= 8
    assert all(document["urgency"] in URGENCIES for document in parsed)
    assert constrained == answers(ENUM_JSON_SCHEMA)[1]
    free = answers("urgency STRING NOT NULL, refund_requested BOOLEAN")[1]
    assert free == answers(FreeTriage)[1]
    # Where DDL allows any string the random model writes anything.
    assert any(not re.match(r'\{"urgency":"(low|medium|high)"', row["response"]) for row in free)
    tickets.unpersist()


def test_bad_schemas_and_choices_fail_on_the_driver_naming_what_is_wrong(spark, registered_tiny):
    name, _ = registered_tiny
    df = spark.createDataFrame([("a", "text")], "ticket_id STRING, body STRING")
    uri = f"models:/{name}@champion"
    with pytest.raises(ValueError, match="is not a Spark DDL schema"):
        apply_instruction(df, INSTRUCTION, input_col="body", model_uri=uri, schema="order_id STRNG,")
    with pytest.raises(ValueError, match="'when' has type binary"):
        apply_instruction(df, INSTRUCTION, input_col="body", model_uri=uri, schema="when BINARY")
    with pytest.raises(ValueError, match=r"schema field 'order.level' has enum \[1, 2\], not of strings"):
        apply_instruction(df, INSTRUCTION, input_col="body", model_uri=uri, schema={"type": "object", "properties": {
            "order": {"type": "object", "properties": {"level": {"enum": [1, 2]}}}}})
    with pytest.raises(ValueError, match="at least two"):
        apply_instruction(df, INSTRUCTION, input_col="body", model_uri=uri, choices=["only"])


def test_a_spark_schema_becomes_a_json_schema_with_every_field_required():
    struct = StructType.fromJson({"type": "struct", "fields": [
        {"name": "order_id", "type": "string", "nullable": True, "metadata": {"comment": "as written"}},
        {"name": "refund", "type": "boolean", "nullable": False, "metadata": {}},
        {"name": "items", "type": {"type": "array", "elementType": "long", "containsNull": False},
         "nullable": True, "metadata": {}},
        {"name": "opened", "type": "date", "nullable": True, "metadata": {}}]})
    assert json_schema(struct) == {
        "type": "object", "additionalProperties": False, "required": ["order_id", "refund", "items", "opened"],
        "properties": {
            "order_id": {"type": ["string", "null"], "description": "as written"},
            "refund": {"type": "boolean"},
            "items": {"type": ["array", "null"], "items": {"type": "integer", "minimum": -2**63, "maximum": 2**63 - 1}},
            "opened": {"type": ["string", "null"], "format": "date"},
        }}


@pytest.mark.slow
def test_the_triage_job_merges_typed_results_and_reruns_only_what_changed(spark, registered_tiny):
    import dataclasses

    from dolly_spark.batch.summarize import run_summarize
    from dolly_spark.spark.tables import delta_version
    from summarize_helpers import config_for, make_source, one_row_per_ticket

    name, _ = registered_tiny
    source = make_source(spark, "tickets_triage")
    config = config_for(source, "triage_out", f"models:/{name}@champion", instruction=INSTRUCTION,
                        choices=["billing", "shipping", "technical"], schema="refund_requested BOOLEAN, quantity INT",
                        max_new_tokens=72, max_attempts=1)
    report = run_summarize(spark, config)
    assert (report.rows_written, report.errors) == (6, 1)  # T-3 has no text
    target = spark.read.table("triage_out")
    assert target.schema["label_probabilities"].dataType == MapType(StringType(), DoubleType())
    assert target.schema["parsed"].dataType == as_struct("refund_requested BOOLEAN, quantity INT")
    rows = one_row_per_ticket(spark, "triage_out")
    for ticket, row in rows.items():
        if ticket == "T-3":
            assert row["error"] and row["label"] is None and row["parsed"] is None
        else:
            assert row["label"] in config.choices and row["parsed"] is not None, row

    version = delta_version(spark, "triage_out")
    assert run_summarize(spark, config).rows_pending == 0 and delta_version(spark, "triage_out") == version
    # A target written with other types, or one whose structured answers a run would leave stale,
    # is refused before anything runs.
    with pytest.raises(ValueError, match=r"other types than this run writes \(parsed is struct<refund_requested:"
                                         r"boolean,quantity:int>, this run writes struct<quantity:string>\)"):
        run_summarize(spark, dataclasses.replace(config, schema="quantity STRING"))
    with pytest.raises(ValueError, match=r"holds structured answers \(label, label_probabilities, "
                                         r"label_probability, parsed\) that this run"):
        run_summarize(spark, dataclasses.replace(config, choices=None, schema=None))
    # Other labels are another request: every ticket again.
    assert run_summarize(spark, dataclasses.replace(config, choices=["billing", "other"])).rows_pending == 6


def test_the_triage_config_is_the_demos_and_lists_come_from_the_command_line():
    from pathlib import Path

    from dolly_spark.job_config import load_config
    from dolly_spark.batch.demo import TRIAGE_FIELDS, TRIAGE_INSTRUCTION, TRIAGE_LABELS, TRIAGE_SCHEMA
    from dolly_spark.batch.summarize import SummarizeConfig

    conf = str(Path(__file__).resolve().parents[2] / "conf" / "triage_tickets.yaml")
    config = load_config(SummarizeConfig, ["--config", conf], "summarize", "")
    assert (config.instruction, config.choices, config.schema) == (TRIAGE_INSTRUCTION, TRIAGE_LABELS, TRIAGE_SCHEMA)
    assert as_struct(config.schema) == TRIAGE_FIELDS
    flagged = load_config(SummarizeConfig, ["--config", conf, "--choices", "billing, other"], "summarize", "")
    assert flagged.choices == ["billing", "other"]
