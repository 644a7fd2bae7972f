"""Turn variant results into the figures we report: ratios, MFU, targets, markdown and JSON.

MFU = 2 x matmul parameters x (prompt + generated tokens) / seconds / peak FLOP/s, with real
(unpadded) tokens: padding and finished rows that keep decoding are work the model did but
not useful work, so they lower MFU rather than raise it. The peak is the measured fp32 matmul
rate of the thread layout the variant ran in: two single-threaded workers at once for
apply_instruction, the driver's threads for the bare engine. Attention-score FLOPs (which grow
with context) are not counted, as is usual for this estimate.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from benchmarks.variants import APPLY, APPLY_BF16, ENGINE, MLFLOW, PIPELINE, VARIANTS, VariantResult

# Goals on the 2-core CPU machine, set for the demo model (SmolLM2-135M): reported against,
# never asserted. The tiny model's figures show the Spark layer's fixed costs instead.
GOALS_MODEL = "demo"
TARGETS = {"vs_mlflow_spark_udf": 3.0, "vs_per_row_pipeline": 2.5, "vs_bare_engine": 0.9, "mfu_apply_instruction": 0.60}
EXACT_COUNTS = ("engine", "pipeline token ids")
LABELS = {APPLY: "(a) apply_instruction", APPLY_BF16: "(a') apply_instruction, dtype=bfloat16", MLFLOW: "(b) mlflow spark_udf", PIPELINE: "(c) per-row pipeline UDF",
          ENGINE: "(d) bare engine (driver)"}


def mfu(result: VariantResult, matmul_params: int, peak_flops: float) -> float:
    """Model FLOP utilization of one timed run (see the module docstring)."""
    flops = 2.0 * matmul_params * (result.prompt_tokens + result.generated_tokens)
    return flops / result.seconds / peak_flops


def model_entry(meta: dict[str, Any], results: dict[str, VariantResult], machine: dict[str, Any]) -> dict[str, Any]:
    """The JSON entry of one model's run: its variants, rows/s ratios of (a), MFU and targets."""
    apply = results.get(APPLY)
    ratios = {}
    for key, other in (("vs_mlflow_spark_udf", MLFLOW), ("vs_per_row_pipeline", PIPELINE), ("vs_bare_engine", ENGINE)):
        if apply and other in results:
            ratios[key] = apply.rows_per_second / results[other].rows_per_second
        if APPLY_BF16 in results and other in (MLFLOW, PIPELINE) and other in results:
            ratios[f"bf16_{key}"] = results[APPLY_BF16].rows_per_second / results[other].rows_per_second
    params = meta["parameters"]["matmul"]
    figures = {}
    if apply:
        figures[APPLY] = mfu(apply, params, machine["peak_flops_2_workers_x_1_thread"])
    if ENGINE in results:
        figures[ENGINE] = mfu(results[ENGINE], params, machine["peak_flops_driver_threads"])
        phases = results[ENGINE].extra.get("phases")
        if phases:
            for phase in ("prefill", "decode"):
                flops = 2.0 * params * phases[f"{phase}_tokens"]
                figures[f"{ENGINE}_{phase}"] = flops / phases[f"{phase}_seconds"] / machine["peak_flops_driver_threads"]
    targets = {}
    for key, goal in TARGETS.items():
        value = figures.get(APPLY) if key == "mfu_apply_instruction" else ratios.get(key)
        if value is not None and meta["model"] == GOALS_MODEL:
            targets[key] = {"goal": goal, "value": value, "met": value >= goal}
    return {**meta, "variants": {name: r.as_dict() for name, r in results.items()}, "ratios": ratios,
            "mfu": figures, "targets": targets}


# --------------------------------------------------------------------------------------------
def _fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def _loads(variant: dict[str, Any]) -> str:
    if variant["loads_warmup"] is None:
        return "n/a"
    return f"{variant['loads_warmup']} / {variant['loads_timed']}"


def markdown(report: dict[str, Any]) -> str:
    """The human-readable report: one table per model, then ratios, targets and the machine."""
    machine = report["machine"]
    lines = ["# dolly_spark benchmark", "",
             f"{report['generated_at']} · wall time {report['wall_seconds']:.0f} s · Spark {report['spark_master']} · "
             f"greedy · max_new_tokens {report['settings']['max_new_tokens']} · seed {report['settings']['seed']} · "
             f"token_budget {report['settings']['token_budget']} · max_batch_rows {report['settings']['max_batch_rows']}", ""]
    for entry in report["models"]:
        p = entry["prompt_tokens"]
        lines += [f"## {entry['model']}: {entry['model_uri']} ({entry['prompt_format']} format, "
                  f"{entry['parameters']['matmul'] / 1e6:.2f} M matmul parameters)", "",
                  f"{entry['rows']} rows in {entry['partitions']} partitions; prompts {p['min']}–{p['max']} tokens "
                  f"(mean {p['mean']:.0f}).", "",
                  "| variant | rows/s | generated tok/s | seconds | prompt tok | generated tok | padding waste | "
                  "model loads (warm-up / timed) | warm-up s | MFU |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name in VARIANTS:
            v = entry["variants"].get(name)
            if v is None:
                continue
            tokens_note = "" if v["token_counts_from"] in EXACT_COUNTS else "*"
            lines.append(
                f"| {LABELS[name]} | {_fmt(v['rows_per_second'])} | {_fmt(v['generated_tokens_per_second'], 1)}{tokens_note} | "
                f"{_fmt(v['seconds'])} | {v['prompt_tokens']:,}{tokens_note} | {v['generated_tokens']:,}{tokens_note} | "
                f"{_fmt(v['padding_waste'])} | {_loads(v)} | {_fmt(v['warmup_seconds'], 1)} | "
                f"{_fmt(100 * entry['mfu'][name], 2) + ' %' if name in entry['mfu'] else 'n/a'} |")
        phases = entry["variants"].get(ENGINE, {}).get("extra", {}).get("phases")
        if phases:
            lines += ["", f"Where (d)'s time goes: the same rows with max_new_tokens=1 (prefill and first token) took "
                      f"{phases['prefill_seconds']:.2f} s, {100 * entry['mfu'][ENGINE + '_prefill']:.0f} % of peak over "
                      f"{phases['prefill_tokens']:,} prompt tokens; the other {phases['decode_seconds']:.2f} s decoded "
                      f"{phases['decode_tokens']:,} tokens, {100 * entry['mfu'][ENGINE + '_decode']:.0f} % of peak "
                      "(a decoding step reads every weight for one token per row)."]
        lines += ["", "Token counts: (a) and (d) from the engine's result, (c) from the pipeline's token ids. (b) returns "
                  "text only: its generated tokens are (c)'s exact counts for rows where both routes returned the same "
                  "text, and re-tokenized text otherwise; \\* marks figures that include re-tokenized text.", ""]
        lines += ["| ratio (rows/s of (a) over) | value | goal | met |", "|---|---:|---:|---|"]
        for key in TARGETS:
            value = entry["mfu"].get(APPLY) if key == "mfu_apply_instruction" else entry["ratios"].get(key)
            if value is None:
                continue
            target = entry["targets"].get(key)
            shown = f"{100 * value:.2f} %" if key.startswith("mfu") else f"{value:.2f}"
            goal = "–" if target is None else (
                f"≥ {100 * target['goal']:.0f} %" if key.startswith("mfu") else f"≥ {target['goal']}")
            met = "–" if target is None else ("yes" if target["met"] else "no")
            lines.append(f"| {key} | {shown} | {goal} | {met} |")
        for key, value in entry["ratios"].items():
            if key.startswith("bf16_"):
                lines.append(f"| {key} ((a') over) | {value:.2f} | – | – |")
        if not entry["targets"]:
            lines.append(f"\nThe goals are set for the {GOALS_MODEL} model; this one shows the Spark layer's fixed costs.")
        lines.append("")
    lines += ["## machine", "",
              f"{machine['cpu']}, {machine['cpu_count']} CPUs, torch {machine['torch']}. Measured fp32 matmul "
              f"({machine['matmul_size']}×{machine['matmul_size']}):", "",
              f"- 1 thread: {machine['peak_flops_1_thread'] / 1e9:.1f} GFLOP/s",
              f"- 2 processes × 1 thread at once (the two Spark workers; MFU peak of (a)): "
              f"{machine['peak_flops_2_workers_x_1_thread'] / 1e9:.1f} GFLOP/s "
              f"({' + '.join(f'{x / 1e9:.1f}' for x in machine['peak_flops_2_workers_each'])})",
              f"- 1 process × {machine['torch_threads_driver']} threads (the driver; MFU peak of (d)): "
              f"{machine['peak_flops_driver_threads'] / 1e9:.1f} GFLOP/s",
              f"- Spark Python workers: {machine.get('spark_workers', 'n/a')}", ""]
    return "\n".join(lines)


def write_reports(report: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """Write latest.md (through a temporary file, so a reader never sees half a report) and
    latest.json into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md_path, json_path = out_dir / "latest.md", out_dir / "latest.json"
    staging = out_dir / "latest.md.tmp"
    staging.write_text(markdown(report) + "\n", encoding="utf-8")
    os.replace(staging, md_path)
    json_path.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    return md_path, json_path
