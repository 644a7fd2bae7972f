"""The summarize job's configuration: every option of ``run_summarize``, its ``--help`` text and
its default (filled from defaults, a YAML file, then flags by ``dolly_spark.job_config``)."""
from __future__ import annotations

from dataclasses import dataclass

from dolly_spark.inference.engines import AUTO, ENGINE_CHOICES
from dolly_spark.job_config import option

DEFAULT_INSTRUCTION = (
    "Summarize this customer support ticket in one or two sentences: what the customer needs, "
    "and how urgent it is."
)


@dataclass
class SummarizeConfig:
    source_table: str = option("support_tickets", "Delta table of tickets to summarize")
    target_table: str = option("ticket_summaries", "Delta table the results are MERGEd into, one row per ticket id")
    model_uri: str = option("models:/support_dolly@champion",
                            "models:/name@alias, models:/name/version, a local checkpoint or a hub id")
    instruction: str = option(DEFAULT_INSTRUCTION, "the instruction each ticket's text is the input of")
    id_col: str = option("ticket_id", "the ticket id column of the source table (the MERGE key)")
    text_col: str = option("body", "the ticket text column of the source table")
    max_new_tokens: int = option(96, "the longest summary, in tokens")
    repetition_penalty: float | None = option(None, "> 1 discourages tokens already in the summary "
                                              "(1.0: off); default: the value registered with the model version")
    no_repeat_ngram_size: int | None = option(None, "no n-gram of this size twice in the summary (0: off); "
                                              "default: the value registered with the model version")
    max_rows: int = option(0, "process at most this many pending tickets in one run, those of lowest id; the rest "
                           "stay pending for the next run (0: all of them)")
    max_hours: float = option(0, "process at most the pending tickets this many hours take, by the estimated rate "
                              "(see calibrate_rows); the rest stay pending for the next run (0: no limit)")
    fail_over_budget: bool = option(False, "refuse to run, before generating anything and with the estimate in the "
                                    "error, when more tickets are pending than max_rows or max_hours allow")
    dry_run: bool = option(False, "estimate the run instead of running it: pending tickets and why, their prompt "
                           "tokens, the time and cost; nothing is written to the target")
    calibrate_rows: int = option(512, "the most tickets generated (and discarded) to measure the rate for the "
                                 "estimate and max_hours, when MLflow holds no earlier run of the same request "
                                 "answered by the same engine on the same kind of task slot: a full micro-batch "
                                 "(64 tickets) per task slot, as a run batches them, within this (0: never)")
    price_per_hour: float = option(0, "the price of one executor-hour, for the estimate's cost (0: no cost)")
    chunk_rows: int = option(5000, "tickets generated and merged per chunk (chunks are ranges of the id); "
                             "a crash loses at most one chunk")
    token_budget: int = option(16384, "tokens per generation micro-batch: rows x (prompt + max_new_tokens)")
    max_input_tokens: int = option(4096, "the longest prompt (template, instruction and ticket), in tokens; "
                                   "a longer ticket is cut from its end and flagged truncated")
    arrow_batch_size: int = option(256, "rows per Arrow batch sent to a Python worker")
    prompt_format: str | None = option(None, "dolly, chat or plain; default: the model's registered format")
    partitions: int = option(0, "Spark tasks a chunk is generated in (0: one per GPU on GPU executors, "
                             "from spark.executor/task.resource.gpu.amount; else one per executor core)")
    max_attempts: int = option(3, "runs that try a ticket whose result is an error before giving up on it "
                               "(until its text, the instruction, a setting or the model changes); an error a "
                               "retry cannot change (a null, empty or over-long ticket, a greedy answer cut off) "
                               "is given up at once")
    choices: list[str] | None = option(None, "classify each ticket into exactly one of these labels, by scoring "
                                       "(a YAML list, or comma-separated on the command line); the target gains "
                                       "label, label_probability and label_probabilities")
    schema: str | dict | None = option(None, "extract into these typed fields (a Spark DDL schema such as 'order_id "
                                       "STRING, refund_requested BOOLEAN', or a JSON Schema: a YAML mapping or JSON "
                                       "text, where enum limits a field to fixed values): answers are JSON "
                                       "constrained to it, parsed into the target's struct column parsed")
    shared_model_dir: str = option("", "download the model once on the driver into this directory, which every node "
                                   "reads (a UC Volume, DBFS), for executors without registry access; "
                                   "empty: each node downloads it into its local cache")
    claim_timeout_minutes: float = option(60, "a run claims its target table; a claim without a heartbeat "
                                          "(refreshed between chunks) for this long is taken to be a dead run's, "
                                          "and taken over")
    engine: str = option(AUTO, f"the engine that runs the model: {', '.join(ENGINE_CHOICES)} (auto: vllm on executors "
                         "with a CUDA device and vLLM installed, hf elsewhere; how rows are run, never what they "
                         "answer: a change of engine reprocesses nothing)")
    experiment: str = option("dolly_spark", "MLflow experiment of the job's runs")
