"""python benchmarks/gpu_engine.py --out gpu_engine.json [--rows 48] [--max-new-tokens 64] [--skip-llama] [--skip-pipeline] [--[no-]vllm] [--cpu-smoke]

The engine on a GPU, with no Spark, no Java, no MLflow and no network: a random-weight GPT-NeoX
of the dolly-v2-3b architecture (the pythia-2.8b config) in bf16, a tokenizer trained on the
spot, and the benchmark's synthetic tickets, run three ways over the same rows:

1. a transformers ``text-generation`` pipeline, one row at a time (what a hand-written UDF does);
2. the engine's static batching (length-sorted, token-budgeted, left-padded micro-batches), with
   the prompt prefix all rows share (template and instruction) prefilled once per micro-batch,
   and again with that reuse off; both also with a long (about 150-token) instruction;
3. the engine's continuous batching (transformers ``generate_batch``; the engine falls back to
   static batching when the architecture does not support it, and this script reports that).

4. where vLLM is importable (``--vllm``), the "vllm" engine on the same weights, saved to a
   checkpoint, with its share of the decode roofline (the longest answer's steps, each reading
   every weight once at the device's datasheet bandwidth, over the time taken);

and, as an extra continuous-batching data point, a Llama-architecture model of about the same
size through (2) and (3). Random weights generate random tokens, so throughput is meaningful and
the text is not. Greedy decoding throughout.

Only dolly_spark.inference (the engine, its configuration and devices), .request, .prompts,
.testing.tiny_models (its tokenizer builder) and benchmarks.workload are imported, none of which
imports pyspark or mlflow; a guard below makes
them look uninstalled, so any import of them fails and a run proves it. ``--cpu-smoke`` shrinks the
models to 2 layers of hidden 256 and the workload to 8 rows, to check the script on a CPU box.
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import tempfile
import logging
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from anywhere, no install needed
    sys.path.insert(0, str(REPO_ROOT))

FORBIDDEN = ("pyspark", "mlflow", "py4j", "delta")


def _forbid_imports() -> None:
    """Make Spark, MLflow and their bridges look absent, so this script cannot depend on them
    even on a machine where they happen to be installed: a None entry in sys.modules makes
    ``import mlflow`` fail and ``importlib.util.find_spec("mlflow")`` (what optional-dependency
    probes such as accelerate's use) answer None."""
    for name in FORBIDDEN:
        if sys.modules.get(name) is None:
            sys.modules[name] = None  # type: ignore[assignment]


_forbid_imports()

import torch  # noqa: E402 - after the import guard on purpose

from benchmarks.workload import INSTRUCTION, LONG_INSTRUCTION, generate_tickets, tokenizer_corpus  # noqa: E402
from dolly_spark.inference.devices import select_device, select_dtype  # noqa: E402
from dolly_spark.inference.engine import InstructionEngine  # noqa: E402
from dolly_spark.inference.engines import EngineConfig, Rows  # noqa: E402
from dolly_spark.request import Request  # noqa: E402
from dolly_spark.prompts import get_format  # noqa: E402
from dolly_spark.testing.tiny_models import train_tiny_tokenizer  # noqa: E402

log = logging.getLogger("gpu_engine")

# pythia-2.8b, the base of databricks/dolly-v2-3b.
DOLLY_V2_3B = dict(hidden_size=2560, num_hidden_layers=32, num_attention_heads=32, intermediate_size=10240,
                   rotary_pct=0.25, vocab_size=50280, max_position_embeddings=2048, use_parallel_residual=True)
# A Llama of about the same parameter count (2.8 B): same width and depth, a SwiGLU MLP sized so
# its three matrices hold what GPT-NeoX's two do, full multi-head attention, untied head.
LLAMA_SIMILAR = dict(hidden_size=2560, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                     intermediate_size=6912, vocab_size=50280, max_position_embeddings=2048, tie_word_embeddings=False)
SMOKE = dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, intermediate_size=1024)
SMOKE_LLAMA = dict(SMOKE, num_key_value_heads=4, intermediate_size=688)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="where the JSON results go")
    parser.add_argument("--rows", type=int, default=None, help="tickets (default 48; 8 with --cpu-smoke)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="tokens per row (default 64; 8 with --cpu-smoke)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--token-budget", type=int, default=16384, help="the engine's micro-batch token budget")
    parser.add_argument("--skip-llama", action="store_true", help="skip the Llama continuous-batching data point")
    parser.add_argument("--skip-pipeline", action="store_true",
                        help="skip the per-row pipeline baseline (its first pass is most of the run's time)")
    parser.add_argument("--vllm", action=argparse.BooleanOptionalAction, default=None,
                        help="also run the 'vllm' engine on the same weights (default: where vLLM is importable)")
    parser.add_argument("--bandwidth-gbs", type=float, default=None,
                        help="the device's memory bandwidth in GB/s, for the vllm route's roofline share "
                             "(default: the datasheet figure of a known GPU)")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="2 layers of hidden 256, 8 rows, 8 new tokens: checks the script on a CPU in under a minute")
    args = parser.parse_args(argv)
    args.rows = args.rows or (8 if args.cpu_smoke else 48)
    args.max_new_tokens = args.max_new_tokens or (8 if args.cpu_smoke else 64)
    if args.vllm is None:
        args.vllm = importlib.util.find_spec("vllm") is not None
    return args


# Datasheet memory bandwidths (GB/s) of GPUs the benchmark has run on or is meant for.
BANDWIDTH_GBS = {"H200": 4800, "H100 80GB HBM3": 3350, "H100 PCIe": 2000, "A100-SXM4-80GB": 2039,
                 "A100-SXM4-40GB": 1555, "A10G": 600, "L4": 300, "T4": 320}


def device_bandwidth(name: str, given_gbs: float | None) -> float | None:
    """Bytes/s: ``given_gbs``, else the datasheet figure of the first known GPU ``name`` contains."""
    if given_gbs:
        return given_gbs * 1e9
    return next((gbs * 1e9 for key, gbs in BANDWIDTH_GBS.items() if key in name), None)


def build_tokenizer():
    """A byte-level BPE tokenizer trained on tickets the benchmark rows do not use, with the Dolly
    special tokens. Its vocabulary is smaller than the model's: ids past its end decode to nothing,
    which only matters for the (meaningless) text of a random model."""
    return train_tiny_tokenizer(tokenizer_corpus(), vocab_size=8192)


def build_model(architecture: str, tokenizer, device: torch.device, dtype: torch.dtype, smoke: bool):
    """A random-weight causal LM of ``architecture`` ("gpt_neox" or "llama"), on ``device``."""
    from transformers import AutoModelForCausalLM, GPTNeoXConfig, LlamaConfig

    special = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                   bos_token_id=tokenizer.eos_token_id)
    if architecture == "gpt_neox":
        config = GPTNeoXConfig(**{**DOLLY_V2_3B, **(SMOKE if smoke else {}), **special}, tie_word_embeddings=False)
    else:
        config = LlamaConfig(**{**LLAMA_SIMILAR, **(SMOKE_LLAMA if smoke else {}), **special})
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the GPU: 2.8 B parameters on the CPU first would take minutes
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, action: Callable[[], Any]) -> tuple[Any, float]:
    _synchronize(device)
    started = time.perf_counter()
    value = action()
    _synchronize(device)
    return value, time.perf_counter() - started


def run_pipeline(model, tokenizer, prompts: list[str], warm: list[str], max_new_tokens: int, device) -> dict[str, Any]:
    """One row at a time through a text-generation pipeline, token counts from its token ids."""
    from transformers import pipeline

    pipe = pipeline("text-generation", model=model, tokenizer=tokenizer)

    def generate(items: list[str]) -> tuple[int, int]:
        prompt_total = generated_total = 0
        for prompt in items:
            sequence = pipe(prompt, max_new_tokens=max_new_tokens, do_sample=False, return_tensors=True)[0]["generated_token_ids"]
            prompt_length = len(tokenizer(prompt)["input_ids"])
            prompt_total += prompt_length
            generated_total += len(sequence) - prompt_length
        return prompt_total, generated_total

    if warm:
        timed(device, lambda: generate(warm))
    _, first_pass = timed(device, lambda: generate(prompts))
    (prompt_tokens, generated_tokens), seconds = timed(device, lambda: generate(prompts))
    # The pipeline (and the closure over it) goes with this frame: nothing else holds it.
    return {**_figures(len(prompts), seconds, prompt_tokens, generated_tokens), "first_pass_seconds": first_pass}


def run_engine(model, tokenizer, bodies: list[str], warm: list[str], request: Request, config: EngineConfig, device,
               instruction: str = INSTRUCTION) -> dict[str, Any]:
    """The engine over all rows in one run, after a warm-up run; reports a continuous-batching
    fallback when the engine fell back to static batching."""
    engine = InstructionEngine(model, tokenizer, "dolly", config)
    fallbacks = _FallbackRecorder()
    logging.getLogger("dolly_spark.inference.engine").addHandler(fallbacks)
    try:
        figures = _time_engine(engine, bodies, warm, request, device, instruction)
    finally:
        logging.getLogger("dolly_spark.inference.engine").removeHandler(fallbacks)
    figures.update({
        "strategy_requested": config.strategy,
        # The engine switches itself to static batching for good when continuous batching fails.
        "strategy_used": engine.prepare(request).strategy,
        "fallback_messages": fallbacks.messages[:3],
        "padding_waste": engine.stats.padding_waste,
        "micro_batches": len(engine.stats.micro_batches),
        "reused_prefix_tokens": engine.stats.reused_prefix_tokens,
    })
    return figures


def run_vllm(checkpoint: Path, bodies: list[str], warm: list[str], request: Request, config: EngineConfig, device,
             weight_bytes: int, bandwidth: float | None) -> dict[str, Any]:
    """The "vllm" engine on the same weights (saved to ``checkpoint``) over the same rows, after
    a warm-up run. With the device's memory ``bandwidth`` (bytes/s), also the share of the decode
    roofline: every decoding step reads every weight once, and vLLM decodes all rows together,
    so the ideal is the longest answer's steps at that bandwidth."""
    from dolly_spark.inference.vllm_engine import VllmEngine

    engine = VllmEngine.from_pretrained(str(checkpoint), prompt_format="dolly", config=config)
    figures = _time_engine(engine, bodies, warm, request, device, INSTRUCTION)
    if bandwidth:
        figures["decode_roofline_share"] = figures["longest_answer"] * weight_bytes / bandwidth / figures["seconds"]
    del engine
    return figures


def _time_engine(engine, bodies: list[str], warm: list[str], request: Request, device,
                 instruction: str) -> dict[str, Any]:
    """Figures of ``engine`` (either engine) on all rows: a warm-up run, a first pass, then the
    timed pass."""
    if warm:
        timed(device, lambda: engine.run(Rows([instruction] * len(warm), warm), request))
    _, first_pass = timed(device, lambda: engine.run(Rows([instruction] * len(bodies), bodies), request))
    # The backends count into the engine's stats object: reset it in place.
    engine.stats.__init__()
    results, seconds = timed(device, lambda: engine.run(Rows([instruction] * len(bodies), bodies), request))
    figures = _figures(len(bodies), seconds, sum(r.prompt_tokens for r in results),
                       sum(r.completion_tokens for r in results))
    figures.update({"first_pass_seconds": first_pass,
                    "failed_rows": sum(1 for r in results if r.finish_reason == "error"),
                    "longest_answer": max((r.completion_tokens for r in results), default=0)})
    return figures


class _FallbackRecorder(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage()[:300])


def _figures(rows: int, seconds: float, prompt_tokens: int, generated_tokens: int) -> dict[str, Any]:
    return {"rows": rows, "seconds": seconds, "prompt_tokens": prompt_tokens, "generated_tokens": generated_tokens,
            "rows_per_second": rows / seconds, "generated_tokens_per_second": generated_tokens / seconds,
            "total_tokens_per_second": (prompt_tokens + generated_tokens) / seconds}


def _release_memory() -> None:
    """Free the previous model's GPU memory before the next one is built."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    log.setLevel(logging.INFO)
    started = time.perf_counter()
    device = select_device()
    if device.type != "cuda" and not args.cpu_smoke:
        log.warning("no GPU found: running the full-size models on the CPU will take very long; use --cpu-smoke")
    dtype = select_dtype(device)

    tokenizer = build_tokenizer()
    tickets = generate_tickets(args.rows, args.seed)
    bodies = [body for _, body in tickets]
    # Warm-up rows run before each timed run (CUDA context, cuBLAS handles, kernels); the smoke
    # run only checks that every path works, so it skips them.
    warm = [] if args.cpu_smoke else [body for _, body in generate_tickets(2, args.seed + 1)]
    request = Request(max_new_tokens=args.max_new_tokens, require_input=True)
    static = EngineConfig(token_budget=args.token_budget)
    static_no_prefix = EngineConfig(token_budget=args.token_budget, reuse_prefix=False)
    continuous = EngineConfig(token_budget=args.token_budget, strategy="continuous")
    # Under half the GPU each: one architecture's vLLM may keep its memory until the process ends.
    vllm_config = EngineConfig(engine="vllm", token_budget=args.token_budget, gpu_memory_utilization=0.4)
    bandwidth = device_bandwidth(torch.cuda.get_device_name(device), args.bandwidth_gbs) if device.type == "cuda" else None
    # The pipeline gets the very prompt text the engine renders for the same rows.
    prompts = [get_format("dolly").prompt(INSTRUCTION, body) for body in bodies]
    warm_prompts = [get_format("dolly").prompt(INSTRUCTION, body) for body in warm]

    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype), "torch": torch.__version__, "cpu_smoke": args.cpu_smoke, "skip_pipeline": args.skip_pipeline,
        "vllm": args.vllm, "bandwidth_bytes_per_second": bandwidth,
        "rows": args.rows, "max_new_tokens": args.max_new_tokens, "token_budget": args.token_budget,
        "tokenizer_vocab": len(tokenizer), "models": {},
    }
    architectures = ["gpt_neox"] + ([] if args.skip_llama else ["llama"])
    for architecture in architectures:
        log.info("%s: building the model", architecture)
        model = build_model(architecture, tokenizer, device, dtype, args.cpu_smoke)
        entry: dict[str, Any] = {"parameters": sum(p.numel() for p in model.parameters()),
                                 "config": {k: getattr(model.config, k) for k in (*DOLLY_V2_3B, "rope_parameters")
                                            if hasattr(model.config, k)}}
        if architecture == "gpt_neox" and not args.skip_pipeline:  # the per-row baseline once, on the dolly-v2-3b architecture
            log.info("%s: per-row pipeline", architecture)
            entry["per_row_pipeline"] = run_pipeline(model, tokenizer, prompts, warm_prompts, args.max_new_tokens, device)
        for route, config, instruction in (("engine_static", static, INSTRUCTION),
                                             ("engine_static_no_prefix", static_no_prefix, INSTRUCTION),
                                             ("engine_static_long", static, LONG_INSTRUCTION),
                                             ("engine_static_long_no_prefix", static_no_prefix, LONG_INSTRUCTION)):
            log.info("%s: %s", architecture, route)
            entry[route] = run_engine(model, tokenizer, bodies, warm, request, config, device, instruction)
        log.info("%s: engine, continuous batching", architecture)
        entry["engine_continuous"] = run_engine(model, tokenizer, bodies, warm, request, continuous, device)
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        with tempfile.TemporaryDirectory(prefix="gpu-engine-") as checkpoint:
            if args.vllm:
                model.save_pretrained(checkpoint)
                tokenizer.save_pretrained(checkpoint)
            del model
            _release_memory()
            if args.vllm:
                log.info("%s: the vllm engine", architecture)
                entry["engine_vllm"] = run_vllm(Path(checkpoint), bodies, warm, request, vllm_config, device,
                                                weight_bytes, bandwidth)
                _release_memory()
        entry["ratios"] = _ratios(entry)
        report["models"][architecture] = entry

    report["forbidden_modules_imported"] = sorted(
        name for name, module in sys.modules.items() if name.split(".")[0] in FORBIDDEN and module is not None)
    report["wall_seconds"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(summary(report))
    return 0


ROUTES = ("per_row_pipeline", "engine_static", "engine_static_no_prefix", "engine_static_long",
          "engine_static_long_no_prefix", "engine_continuous", "engine_vllm")
# (name, route, baseline): generated tokens/s of a route over its baseline's.
RATIOS = (("static_vs_pipeline", "engine_static", "per_row_pipeline"),
          ("continuous_vs_pipeline", "engine_continuous", "per_row_pipeline"),
          ("continuous_vs_static", "engine_continuous", "engine_static"),
          ("prefix_reuse_gain", "engine_static", "engine_static_no_prefix"),
          ("prefix_reuse_gain_long", "engine_static_long", "engine_static_long_no_prefix"),
          ("vllm_vs_static", "engine_vllm", "engine_static"),
          ("vllm_vs_pipeline", "engine_vllm", "per_row_pipeline"))


def _ratios(entry: dict[str, Any]) -> dict[str, float]:
    """Ratios between routes that both answered every row: a route with failed rows did less
    work, so its speed says nothing (it is flagged in the summary instead)."""
    complete = {name: figures["generated_tokens_per_second"] for name, figures in entry.items()
                if isinstance(figures, dict) and "generated_tokens_per_second" in figures
                and not figures.get("failed_rows")}
    return {name: complete[route] / complete[base] for name, route, base in RATIOS
            if route in complete and base in complete}


def summary(report: dict[str, Any]) -> str:
    lines = [f"device {report['device']} ({report['dtype']}), {report['rows']} rows, max_new_tokens "
             f"{report['max_new_tokens']}, wall {report['wall_seconds']:.0f} s",
             f"{'model':<10} {'route':<29} {'seconds':>8} {'1st pass':>8} {'rows/s':>8} {'gen tok/s':>10} {'reused pfx':>10} "
             f"{'strategy used':>14} {'failed':>7}"]
    for architecture, entry in report["models"].items():
        for route in ROUTES:
            if route in entry:
                f = entry[route]
                lines.append(f"{architecture:<10} {route:<29} {f['seconds']:>8.2f} {f['first_pass_seconds']:>8.2f} "
                             f"{f['rows_per_second']:>8.2f} "
                             f"{f['generated_tokens_per_second']:>10.1f} {f.get('reused_prefix_tokens', '-'):>10} "
                             f"{f.get('strategy_used', '-'):>14} {f.get('failed_rows', 0):>7}"
                             + (f"  decode roofline {f['decode_roofline_share']:.1%}" if "decode_roofline_share" in f
                                else ""))
        lines.append(f"{architecture:<10} ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in entry["ratios"].items()))
    lines.append(f"forbidden modules imported: {report['forbidden_modules_imported'] or 'none'}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
