"""The rate an estimate and ``max_hours`` use, without Spark or MLflow: per task slot apart from a
run's fixed seconds; a calibration of full micro-batches; nothing pending needs no rate; choices
generate nothing. (Its history in MLflow: ``test_estimate``.)"""
from __future__ import annotations

import pytest

from dolly_spark.batch.estimate import Estimate, generated_tokens_bound
from dolly_spark.batch.rates import Rate, calibration_rows, row_cap
from dolly_spark.batch.summarize_config import SummarizeConfig
from dolly_spark.inference.engines import EngineConfig
from dolly_spark.request import ModelSpec, build_request

MODEL = ModelSpec("registry", "models:/support_dolly/3", "support_dolly", "3", "chat")


def test_a_rate_per_slot_divides_by_the_slots_at_work_and_keeps_its_fixed_seconds():
    rate = Rate(slot_seconds_per_row=2.0, completion_tokens_per_row=10, source="test", fixed_seconds=30.0)
    assert rate.seconds(100, 2) == 30 + 100
    assert rate.seconds(100, 8) == 30 + 25  # a grown cluster: generating shrinks, loads and MERGEs do not
    assert rate.seconds(3, 8) == 30 + 2  # three rows keep three slots at work, not eight
    assert rate.seconds(0, 8) == 0
    assert rate.rows_within(30 + 25, 8) == 100 and rate.rows_within(29, 8) == 0


def test_nothing_pending_needs_no_rate_and_a_missing_one_says_what_to_do():
    config = SummarizeConfig(source_table="tickets", max_hours=1, calibrate_rows=0)
    assert row_cap(config, None, pending_rows=0, slots=2) == (None, "")
    with pytest.raises(ValueError, match="needs a rate for the 5 pending tickets of tickets: .* set calibrate_rows"):
        row_cap(config, None, pending_rows=5, slots=2)
    cap, why = row_cap(config, Rate(4.0, 0, "test", fixed_seconds=600), pending_rows=10_000, slots=2)
    assert cap == (3600 - 600) * 2 // 4 and why.startswith("max_hours=1 at 4 slot-seconds per ticket on 2 slots")


def test_a_calibration_fills_a_micro_batch_on_each_task_slot():
    engine = EngineConfig()
    assert calibration_rows(2, engine, SummarizeConfig()) == 2 * engine.max_batch_rows
    assert calibration_rows(8, EngineConfig(max_batch_rows=16), SummarizeConfig(arrow_batch_size=8)) == 8 * 8
    assert calibration_rows(4, engine, SummarizeConfig(calibrate_rows=10)) == 10  # the user's bound
    assert calibration_rows(4, engine, SummarizeConfig(calibrate_rows=0)) == 0


def test_choices_alone_count_no_generated_tokens():
    labels = build_request(MODEL, "Triage.", require_input=True, max_new_tokens=32, choices=("billing", "other"))
    summary = build_request(MODEL, "Summarize.", require_input=True, max_new_tokens=32)
    assert (generated_tokens_bound(5, labels), generated_tokens_bound(5, summary)) == (0, 160)
    report = Estimate("tickets", "labels", "support_dolly v3", "hf", "2 CPU task slots", 1, task_slots=2,
                      generates=False).table()
    assert "generated tokens  none: choices are scored, not generated" in report
    assert "engine hf, on 2 CPU-core slots (2 CPU task slots)" in report
