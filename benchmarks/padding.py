"""Padding waste of apply_instruction, recomputed on the driver from its result struct.

The engines that did the work live in the Spark Python workers, and their EngineStats never
reach the driver. What does reach it is enough to recompute them exactly: each row's partition,
prompt_tokens, completion_tokens and finish_reason. The rows of a partition reach the engine in
Arrow batches of ``spark.sql.execution.arrow.maxRecordsPerBatch`` rows, one ``engine.run`` each;
the planner functions the engine plans with (``dolly_spark.inference.planner.micro_batches`` and
``prefill_groups``, called here, not copied, so the replay cannot drift from them) cut each run
into micro-batches and their prefill groups; a micro-batch pads every prompt to its longest and decodes
until its slowest row stops, which is its largest completion_tokens. The same replay gives each
micro-batch's rows, prompt tokens and decoding steps, for the roofline figures.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

from benchmarks.roofline import MicroBatch
from dolly_spark.inference.engines import EngineConfig
from dolly_spark.inference.planner import micro_batches, prefill_groups
from dolly_spark.inference.results import FINISH_ERROR, EngineStats


@dataclass(frozen=True)
class RowTokens:
    """What the driver knows about one generated row."""

    partition: int
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


def replay(rows: Sequence[RowTokens], max_new_tokens: int, config: EngineConfig,
           arrow_batch_rows: int) -> tuple[EngineStats, list[MicroBatch]]:
    """EngineStats as the workers' engines counted them, and their micro-batches (the
    partition as the worker), for ``rows`` in collected order (Spark's collect keeps partition
    order and the row order within each partition)."""
    stats, batches = EngineStats(), []
    by_partition: dict[int, list[RowTokens]] = {}
    for row in rows:
        by_partition.setdefault(row.partition, []).append(row)
    for partition_rows in by_partition.values():
        for start in range(0, len(partition_rows), arrow_batch_rows):
            _replay_run(partition_rows[start:start + arrow_batch_rows], max_new_tokens, config, stats, batches)
    return stats, batches


def _replay_run(run_rows: Sequence[RowTokens], max_new_tokens: int, config: EngineConfig, stats: EngineStats,
                batches: list[MicroBatch]) -> None:
    stats.rows += len(run_rows)
    # Rows refused before generation (null input, over-long prompt) answer with an error and no
    # completion; they never enter a micro-batch.
    generated = [row for row in run_rows if not (row.finish_reason == FINISH_ERROR and row.completion_tokens == 0)]
    # The engine's plan, from the same pure functions of the prompts' lengths.
    plan = micro_batches([row.prompt_tokens for row in generated], config.token_budget, max_new_tokens,
                         config.max_batch_rows)
    for batch in plan:
        members = [generated[index] for index in batch]
        longest = max(row.prompt_tokens for row in members)
        steps = max(row.completion_tokens for row in members)
        stats.micro_batches.append((len(members), longest))
        for group in prefill_groups([row.prompt_tokens for row in members], config.min_length_ratio):
            longest_in_group = members[group[0]].prompt_tokens
            stats.prefill_groups.append((len(group), longest_in_group))
            stats.padded_prompt_tokens += len(group) * longest_in_group
        stats.generated_slots += len(members) * steps
        prompt_tokens = sum(row.prompt_tokens for row in members)
        stats.prompt_tokens += prompt_tokens
        stats.completion_tokens += sum(row.completion_tokens for row in members)
        batches.append(MicroBatch(members[0].partition, len(members), prompt_tokens, steps))


def single_run_rows(results: Iterable, partition: int = 0) -> list[RowTokens]:
    """RowTokens for results of one ``engine.run`` (the bare engine), to check the replay
    against the engine's real stats."""
    return [RowTokens(partition, r.prompt_tokens, r.completion_tokens, r.finish_reason) for r in results]
