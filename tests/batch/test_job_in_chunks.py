"""One pass at any size: the summarize job reads its source once, generates and MERGEs in id-range
chunks that skip each other's target files, and reports progress per chunk."""
from __future__ import annotations

import dataclasses

import pytest
from delta.tables import DeltaTable
from mlflow.tracking import MlflowClient

from dolly_spark.spark.sessions import tasks_per_wave
from dolly_spark.batch.summarize import run_summarize
from dolly_spark.testing.table_scans import TableScans
from summarize_helpers import config_for, one_row_per_ticket

TICKETS = 60


def make_many_tickets(spark, table: str) -> str:
    rows = [(f"T-{i:03d}", f"Ticket {i}: the {('router', 'invoice', 'app')[i % 3]} fails after update {i}.")
            for i in range(TICKETS)]
    # A repeated id and a null id: one summary for the first, none for the second.
    rows += [("T-007", "A second copy of ticket 7."), (None, "No id.")]
    spark.createDataFrame(rows, "ticket_id STRING, body STRING").write.format("delta").mode("overwrite").saveAsTable(table)
    return table


@pytest.mark.slow
def test_one_source_scan_and_one_merge_per_chunk_that_skips_the_other_chunks_files(spark, registered_tiny):
    name, _ = registered_tiny
    source = make_many_tickets(spark, "tickets_chunked")
    config = config_for(source, "summaries_chunked", f"models:/{name}@champion", chunk_rows=20, max_new_tokens=3)
    scans = TableScans(spark)
    report = run_summarize(spark, config)

    assert scans.count("tickets_chunked") == 1  # the source is read once, whatever the chunk count
    # Per chunk, its totals and its (insert-only) MERGE; the first chunk finds no target to count against.
    assert scans.count("summaries_chunked") == 2 * report.chunks - 1
    assert (report.rows_pending, report.skipped_null_ids) == (TICKETS, 1)
    assert report.chunks == 3
    rows = one_row_per_ticket(spark, "summaries_chunked")
    assert len(rows) == TICKETS and report.rows_written == TICKETS

    merges = [row for row in DeltaTable.forName(spark, "summaries_chunked").history().collect()
              if row["operation"] == "MERGE"]
    assert len(merges) == report.chunks

    # Progress per chunk, step by step, in the run's MLflow metrics.
    client = MlflowClient()
    run = client.search_runs([_experiment_id()], order_by=["attribute.start_time DESC"], max_results=1)[0]
    done = client.get_metric_history(run.info.run_id, "rows_done")
    assert [m.step for m in done] == [0, 1, 2] and done[-1].value == TICKETS
    assert all(b.value > a.value for a, b in zip(done, done[1:]))
    assert client.get_metric_history(run.info.run_id, "eta_seconds")[-1].value == 0
    assert all(m.value > 0 for m in client.get_metric_history(run.info.run_id, "rows_per_second"))
    assert run.data.metrics["chunks"] == 3

    # A rerun reads the source once too, and writes nothing.
    scans = TableScans(spark)
    assert run_summarize(spark, config).rows_pending == 0
    assert scans.count("tickets_chunked") == 1 and scans.count("summaries_chunked") == 1

    # A new instruction redoes every ticket: one read of the target for the pending set, then
    # each chunk's reads of the target (its totals, its MERGE) skip the other chunks' files.
    files = spark.sql("DESCRIBE DETAIL summaries_chunked").first()["numFiles"]
    scans = TableScans(spark)
    again = run_summarize(spark, dataclasses.replace(config, instruction="List the customer's problems."))
    assert (again.rows_pending, again.chunks, scans.count("tickets_chunked")) == (TICKETS, 3, 1)
    for_pending, *in_chunks = scans.files_read("summaries_chunked")
    assert files >= 3 and for_pending <= files
    assert in_chunks and max(in_chunks) < files, (files, in_chunks)
    # Totals, then the MERGE's search for matches and its rewrite: each reads its chunk's files once.
    assert sum(in_chunks) <= 3 * files, (files, in_chunks)


@pytest.mark.slow
def test_max_rows_takes_the_first_of_the_pending_set_and_the_rest_next_time(spark, registered_tiny):
    name, _ = registered_tiny
    source = make_many_tickets(spark, "tickets_capped_rows")
    # One chunk a run: the cap applies to the pending set, before it is cut into chunks.
    config = config_for(source, "summaries_capped_rows", f"models:/{name}@champion", max_rows=25, max_new_tokens=2)
    first = run_summarize(spark, config)
    assert (first.rows_pending, first.rows_written, first.chunks) == (25, 25, 1)
    second = run_summarize(spark, config)
    assert second.rows_pending == 25
    assert len(one_row_per_ticket(spark, "summaries_capped_rows")) == 50


@pytest.mark.slow
@pytest.mark.parametrize("id_type", ["BIGINT", "TIMESTAMP"])
def test_chunks_of_other_id_types_keep_one_row_per_ticket(spark, registered_tiny, id_type):
    name, _ = registered_tiny
    source, target = f"tickets_{id_type.lower()}_ids", f"summaries_{id_type.lower()}_ids"
    ids = "id" if id_type == "BIGINT" else "timestamp_seconds(1767225600 + id * 3600)"
    spark.range(20).selectExpr(f"{ids} AS ticket_id", "concat('Ticket ', id, ': the app fails.') AS body") \
        .write.format("delta").mode("overwrite").saveAsTable(source)
    config = config_for(source, target, f"models:/{name}@champion", chunk_rows=10, max_new_tokens=2)
    report = run_summarize(spark, config)
    assert (report.rows_written, report.chunks) == (20, 2)
    rows = spark.read.table(target).select("ticket_id").collect()
    assert len(rows) == len({row["ticket_id"] for row in rows}) == 20
    if id_type == "TIMESTAMP":
        # Timestamps come back through Python's local time: their chunks MERGE without a range,
        # over the rows already there.
        assert run_summarize(spark, dataclasses.replace(config, instruction="List the problems.")).rows_written == 20
        assert spark.read.table(target).count() == 20


def test_one_generation_task_per_gpu_on_gpu_executors_else_the_cores():
    gpus = {"spark.executor.resource.gpu.amount": "4", "spark.task.resource.gpu.amount": "1"}
    assert tasks_per_wave(gpus, executors=3, default_parallelism=96) == 12
    assert tasks_per_wave({**gpus, "spark.task.resource.gpu.amount": "0.5"}, 3, 96) == 24
    # Executors still coming up count too.
    assert tasks_per_wave({**gpus, "spark.executor.instances": "5"}, 1, 8) == 20
    assert tasks_per_wave({}, executors=3, default_parallelism=96) == 96
    assert tasks_per_wave({"spark.executor.resource.gpu.amount": "1"}, 2, 16) == 16  # no task amount: cores


def _experiment_id() -> str:
    import mlflow

    return mlflow.get_experiment_by_name("tests").experiment_id
