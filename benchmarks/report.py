"""Turn variant results into the figures we report: ratios, MFU, roofline, targets, markdown and JSON.

MFU = 2 x matmul parameters x (prompt + generated tokens) / seconds / peak FLOP/s, with real
(unpadded) tokens: padding and finished rows that keep decoding are work the model did but
not useful work, so they lower MFU rather than raise it. The peak is the measured matmul rate
in the variant's precision and thread layout: two single-threaded workers at once for
apply_instruction, the driver's threads for the bare engine. Attention-score FLOPs (which grow
with context) are not counted, as is usual for this estimate.

Roofline efficiency = ideal seconds / measured seconds, the ideal from the run's prompt tokens
and decoding steps on the measured peak and read bandwidth (benchmarks/roofline.py).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from benchmarks.machine import DRIVER, SINGLE, WORKERS
from benchmarks.roofline import Roof, roofline
from benchmarks.variants import (APPLY, APPLY_BF16, APPLY_LONG, APPLY_VLLM, ENGINE, ENGINE_LONG, ENGINE_VLLM, MLFLOW,
                                 PIPELINE, VariantResult, variant_order)

# Goals on the 2-core CPU machine, set for the demo model (SmolLM2-135M): reported against,
# never asserted. The tiny model's figures show the Spark layer's fixed costs instead.
GOALS_MODEL = "demo"
# The engine's goals in the default configuration: (a) at least 3x the best (b) and (c), no slower
# than 0.95x the bare engine, and at 70% of the machine's roofline.
TARGETS = {"vs_mlflow_spark_udf": 3.0, "vs_per_row_pipeline": 3.0, "vs_bare_engine": 0.95,
           "roofline_apply_instruction": 0.70}
EXACT_COUNTS = ("engine", "pipeline token ids")
LABELS = {APPLY: "(a) apply_instruction", APPLY_BF16: "(a') apply_instruction, dtype=bfloat16",
          PIPELINE: "(c) per-row pipeline UDF", ENGINE: "(d) bare engine (driver)",
          APPLY_LONG: "(a) apply_instruction, long instruction", ENGINE_LONG: "(d) bare engine, long instruction",
          APPLY_VLLM: "(a) apply_instruction, engine=vllm", ENGINE_VLLM: "(d) bare engine, engine=vllm"}
# The engine variants: the precision they ran in ("fp32": the CPU default, which is bf16 on AMX
# CPUs: ``meta["default_precision"]``) and the thread layout whose roofs they are measured against.
ROOFLINE_VARIANTS = {APPLY: ("fp32", WORKERS), APPLY_BF16: ("bf16", WORKERS), ENGINE: ("fp32", DRIVER),
                     APPLY_LONG: ("fp32", WORKERS), ENGINE_LONG: ("fp32", DRIVER)}


def label(name: str, variant: dict[str, Any]) -> str:
    if name.startswith(MLFLOW):
        return f"(b) mlflow spark_udf, batch_size {variant['extra'].get('batch_size', 1)}"
    return LABELS[name]


def mfu(result: VariantResult, matmul_params: int, peak_flops: float) -> float:
    """Model FLOP utilization of one timed run (see the module docstring)."""
    flops = 2.0 * matmul_params * (result.prompt_tokens + result.generated_tokens)
    return flops / result.seconds / peak_flops


def machine_roof(machine: dict[str, Any], precision: str, layout: str) -> Roof | None:
    """The measured roof of ``layout`` in ``precision``, or None where it was not measured."""
    figures = machine.get("roofs", {}).get(precision, {}).get(layout)
    return Roof(figures["peak_flops"], figures["bandwidth"]) if figures else None


def mlflow_batches(results: dict[str, VariantResult]) -> dict[str, Any]:
    """(b) at each pipeline batch size: rows/s, (a)'s ratio over each, and the fastest."""
    runs = {r.extra.get("batch_size", 1): r for name, r in results.items() if name.startswith(MLFLOW)}
    if not runs:
        return {}
    best = max(runs, key=lambda size: runs[size].rows_per_second)
    apply = results.get(APPLY)
    return {"best_batch_size": best, "best_variant": runs[best].variant,
            "rows_per_second": {size: r.rows_per_second for size, r in sorted(runs.items())},
            "same_text_as_per_row_pipeline": {size: r.extra.get("rows_with_same_text_as_per_row_pipeline")
                                              for size, r in sorted(runs.items())},
            "apply_over": ({size: apply.rows_per_second / r.rows_per_second for size, r in sorted(runs.items())}
                           if apply else {})}


def model_entry(meta: dict[str, Any], results: dict[str, VariantResult], machine: dict[str, Any]) -> dict[str, Any]:
    """The JSON entry of one model's run: its variants, rows/s ratios of (a) (over the fastest
    (b)), MFU, roofline figures and targets."""
    results = dict(sorted(results.items(), key=lambda item: variant_order(item[0])))
    batches = mlflow_batches(results)
    comparisons = (("vs_mlflow_spark_udf", batches.get("best_variant")), ("vs_per_row_pipeline", PIPELINE),
                   ("vs_bare_engine", ENGINE))
    ratios = {}
    for key, other in comparisons:
        if other not in results:
            continue
        if APPLY in results:
            ratios[key] = results[APPLY].rows_per_second / results[other].rows_per_second
        if APPLY_BF16 in results and other != ENGINE:
            ratios[f"bf16_{key}"] = results[APPLY_BF16].rows_per_second / results[other].rows_per_second
    if APPLY_LONG in results and ENGINE_LONG in results:
        ratios["long_vs_bare_engine"] = results[APPLY_LONG].rows_per_second / results[ENGINE_LONG].rows_per_second
    # The "vllm" engine against the "hf" engine on the same rows, in Spark and bare.
    for key, ours, theirs in (("vllm_vs_hf_apply_instruction", APPLY_VLLM, APPLY), ("vllm_vs_hf_bare_engine", ENGINE_VLLM,
                                                                                     ENGINE)):
        if ours in results and theirs in results:
            ratios[key] = results[ours].rows_per_second / results[theirs].rows_per_second
    params = meta["parameters"]["matmul"]
    figures, rooflines = {}, {}
    for name, (precision, layout) in ROOFLINE_VARIANTS.items():
        # The default-precision variants ran in whatever this machine's CPU default is.
        precision = meta.get("default_precision", precision) if precision == "fp32" else precision
        roof = machine_roof(machine, precision, layout)
        if name not in results or roof is None:
            continue
        result = results[name]
        figures[name] = mfu(result, params, roof.peak_flops)
        rooflines[name] = roofline(params, precision, roof, result.seconds, result.extra["micro_batch_work"],
                                   result.extra.get("phases"))
    phases = results[ENGINE].extra.get("phases") if ENGINE in results else None
    if phases:  # earlier reports' figures: each phase's tokens over the phase's seconds, at the peak
        for phase in ("prefill", "decode"):
            flops = 2.0 * params * phases[f"{phase}_tokens"]
            figures[f"{ENGINE}_{phase}"] = flops / phases[f"{phase}_seconds"] / machine["peak_flops_driver_threads"]
    targets = {}
    for key, goal in TARGETS.items():
        value = _target_value(key, ratios, figures, rooflines)
        if value is not None and meta["model"] == GOALS_MODEL:
            targets[key] = {"goal": goal, "value": value, "met": value >= goal}
    return {**meta, "variants": {name: r.as_dict() for name, r in results.items()}, "ratios": ratios,
            "mlflow_batch_sizes": batches, "mfu": figures, "roofline": rooflines, "targets": targets}


def _target_value(key: str, ratios: dict[str, float], figures: dict[str, float],
                  rooflines: dict[str, dict[str, Any]]) -> float | None:
    if key == "mfu_apply_instruction":
        return figures.get(APPLY)
    if key == "roofline_apply_instruction":
        return rooflines.get(APPLY, {}).get("efficiency")
    return ratios.get(key)


# --------------------------------------------------------------------------------------------
def _fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def _loads(variant: dict[str, Any]) -> str:
    if variant["loads_warmup"] is None:
        return "n/a"
    return f"{variant['loads_warmup']} / {variant['loads_timed']}"


def _pct(value: float | None, digits: int = 0) -> str:
    return "n/a" if value is None else f"{100 * value:.{digits}f} %"


def markdown(report: dict[str, Any]) -> str:
    """The human-readable report: per model its variants, roofline, (b)'s batch sizes, ratios
    and targets; then the machine."""
    settings = report["settings"]
    lines = ["# dolly_spark benchmark", "",
             f"{report['generated_at']} · wall time {report['wall_seconds']:.0f} s · Spark {report['spark_master']} · "
             f"greedy · max_new_tokens {settings['max_new_tokens']} · seed {settings['seed']} · "
             f"token_budget {settings['token_budget']} · max_batch_rows {settings['max_batch_rows']}", ""]
    for entry in report["models"]:
        lines += _model_lines(entry)
    return "\n".join(lines + _machine_lines(report["machine"]))


def _model_lines(entry: dict[str, Any]) -> list[str]:
    p = entry["prompt_tokens"]
    long_prompts = entry.get("prompt_tokens_long_instruction")
    lines = [f"## {entry['model']}: {entry['model_uri']} ({entry['prompt_format']} format, "
             f"{entry['parameters']['matmul'] / 1e6:.2f} M matmul parameters)", "",
             f"{entry['rows']} rows in {entry['partitions']} partitions; prompts {p['min']}–{p['max']} tokens "
             f"(mean {p['mean']:.0f})" + (f"; with the long instruction {long_prompts['min']}–{long_prompts['max']} "
                                          f"(mean {long_prompts['mean']:.0f})" if long_prompts else "") + ".", "",
             "| variant | rows/s | generated tok/s | seconds | prompt tok | generated tok | padding waste | "
             "model loads (warm-up / timed) | warm-up s | MFU |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, v in entry["variants"].items():
        tokens_note = "" if v["token_counts_from"] in EXACT_COUNTS else "*"
        lines.append(
            f"| {label(name, v)} | {_fmt(v['rows_per_second'])} | {_fmt(v['generated_tokens_per_second'], 1)}{tokens_note} | "
            f"{_fmt(v['seconds'])} | {v['prompt_tokens']:,}{tokens_note} | {v['generated_tokens']:,}{tokens_note} | "
            f"{_fmt(v['padding_waste'])} | {_loads(v)} | {_fmt(v['warmup_seconds'], 1)} | "
            f"{_pct(entry['mfu'].get(name), 2)} |")
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
    lines += _roofline_lines(entry) + _mlflow_lines(entry) + _ratio_lines(entry)
    return lines


def _roofline_lines(entry: dict[str, Any]) -> list[str]:
    if not entry["roofline"]:
        return []
    lines = ["Roofline (benchmarks/README.md): ideal = prompt FLOPs at the measured peak + one read of the weights "
             "per decoding step at the measured bandwidth; efficiency = ideal / measured seconds. Prefill MFU and "
             "decode bandwidth use split the run with a max_new_tokens=1 rerun of the same rows.", "",
             "| variant | precision | prompt tok | decoding steps (micro-batches, most rows) | ideal prefill s | "
             "ideal decode s | ideal s | measured s | roofline efficiency | prefill MFU | decode bandwidth use |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in entry["roofline"].items():
        lines.append(
            f"| {label(name, entry['variants'][name])} | {r['precision']} | {r['prompt_tokens']:,} | "
            f"{r['decode_steps']:,} ({r['micro_batches']}, {r['max_rows_per_step']}) | "
            f"{r['ideal_prefill_seconds']:.2f} | {r['ideal_decode_seconds']:.2f} | {r['ideal_seconds']:.2f} | "
            f"{r['seconds']:.2f} | {_pct(r['efficiency'], 1)} | {_pct(r.get('prefill_mfu'))} | "
            f"{_pct(r.get('decode_bandwidth_utilization'))} |")
    notes = []
    for name, r in entry["roofline"].items():
        if r.get("worker_imbalance"):
            notes.append(f"{label(name, entry['variants'][name])}: the slower worker's ideal time is "
                         f"{r['worker_imbalance']:.2f} × the workers' mean")
    ridge = " and ".join(f"{r['ridge_rows']:.0f} ({r['precision']})" for name, r in entry["roofline"].items()
                         if name in (APPLY, APPLY_BF16))
    if ridge:
        notes.append(f"on the workers' roof a decoding step is memory-bound below about {ridge} rows, so the "
                     "memory term is its roofline time up to there (most rows in a step: in the table)")
    return lines + ([""] + ["; ".join(notes) + "."] if notes else []) + [""]


def _mlflow_lines(entry: dict[str, Any]) -> list[str]:
    batches = entry.get("mlflow_batch_sizes") or {}
    if not batches:
        return []
    same = batches.get("same_text_as_per_row_pipeline", {})
    sizes = ", ".join(f"{size}: {rate:.2f} rows/s (text as (c)'s in {same.get(size) or 'n/a'} rows)"
                      for size, rate in batches["rows_per_second"].items())
    lines = [f"(b) by pipeline batch size: {sizes}; ratios of (a) are taken over the fastest, batch_size "
             f"{batches['best_batch_size']}."]
    check = entry.get("mlflow_pipeline_batch_check")
    if check:
        seen = "; ".join(f"batch_size {c['batch_size']} on {c['rows']} rows: forward calls of {c['forward_rows']} rows"
                         f" ({'reaches the pipeline' if c['reaches_pipeline'] else 'DOES NOT reach the pipeline'})"
                         for c in check["checks"])
        lines.append(f"Checked in the driver on {check['model_uri']} (the batched copy, see benchmarks/README.md): "
                     f"{seen}. Its tokenizer pads on the {check['tokenizer_padding_side']}, pad token id "
                     f"{check['pad_token_id']}. Loading it through mlflow.pyfunc takes "
                     f"{check['pyfunc_load_seconds']:.1f} s, which spark_udf in local mode pays in each task, so "
                     "inside every (b) timed run.")
    return lines + [""]


def _ratio_lines(entry: dict[str, Any]) -> list[str]:
    lines = ["| ratio (rows/s of (a) over) or goal | value | goal | met |", "|---|---:|---:|---|"]
    for key in TARGETS:
        value = _target_value(key, entry["ratios"], entry["mfu"], entry["roofline"])
        if value is None:
            continue
        target = entry["targets"].get(key)
        percent = not key.startswith("vs_")
        shown = f"{100 * value:.2f} %" if percent else f"{value:.2f}"
        goal = "–" if target is None else (f"≥ {100 * target['goal']:.0f} %" if percent else f"≥ {target['goal']}")
        met = "–" if target is None else ("yes" if target["met"] else "no")
        lines.append(f"| {key} | {shown} | {goal} | {met} |")
    for key, value in entry["ratios"].items():
        if key.startswith("bf16_"):
            lines.append(f"| {key} ((a') over) | {value:.2f} | – | – |")
        elif key.startswith("long_"):
            lines.append(f"| {key} ((a) over (d), both with the long instruction) | {value:.2f} | – | – |")
        elif key.startswith("vllm_"):
            lines.append(f"| {key} (engine=vllm over engine=hf, rows/s) | {value:.2f} | – | – |")
    if not entry["targets"]:
        lines.append(f"\nThe goals are set for the {GOALS_MODEL} model; this one shows the Spark layer's fixed costs.")
    return lines + [""]


def _machine_lines(machine: dict[str, Any]) -> list[str]:
    layouts = {SINGLE: "1 thread", WORKERS: "2 processes × 1 thread at once (the two Spark workers: (a))",
               DRIVER: f"1 process × {machine['torch_threads_driver']} threads (the driver: (d))"}
    lines = ["## machine", "",
             f"{machine['cpu']}, {machine['cpu_count']} CPUs, torch {machine['torch']}. Measured matmul peak "
             f"(square matmuls of the size given) and weight-read bandwidth (a {machine.get('bandwidth_mib', '?')} MiB "
             "matrix per process: one-row linear / sum; the faster is the roof):", ""]
    for precision, by_layout in machine.get("roofs", {}).items():
        for layout, roof in by_layout.items():
            each = roof.get("each")
            split = " ({} GFLOP/s)".format(" + ".join(f"{e['peak_flops'] / 1e9:.1f}" for e in each)) if each else ""
            lines.append(f"- {precision}, {layouts.get(layout, layout)}: {roof['peak_flops'] / 1e9:.1f} GFLOP/s "
                         f"at {roof['matmul_size']}{split}; {roof['bandwidth'] / 1e9:.1f} GB/s "
                         f"({roof['bandwidth_matvec'] / 1e9:.1f} / {roof['bandwidth_sum'] / 1e9:.1f})")
    lines += [f"- Spark Python workers: {machine.get('spark_workers', 'n/a')}", ""]
    return lines


def write_reports(report: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """Write latest.md and latest.json into ``out_dir``."""
    return write_results(out_dir, "latest", report, markdown(report) + "\n")


def write_results(out_dir: Path, stem: str, report: dict[str, Any], text: str) -> tuple[Path, Path]:
    """Write ``text`` as ``<stem>.md`` (through a temporary file, so a reader never sees half a
    report) and ``report`` as ``<stem>.json`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md_path, json_path = out_dir / f"{stem}.md", out_dir / f"{stem}.json"
    staging = out_dir / f"{stem}.md.tmp"
    staging.write_text(text, encoding="utf-8")
    os.replace(staging, md_path)
    json_path.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    return md_path, json_path
