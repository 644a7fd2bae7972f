"""Variant (c): the pandas UDF a user writes by hand, one row at a time through a transformers pipeline.

This is the baseline apply_instruction has to beat: a ``text-generation`` pipeline loaded once
per Python worker (a module-level cache, kept alive by Spark's worker reuse) and called on each
prompt in turn, greedy, with the same max_new_tokens. No batching, no length sorting, no parsing.

It lives in its own importable module because Spark's workers unpickle the UDF by importing this
module: the cache below must be a module global of the worker process, not of the closure.
"""
from __future__ import annotations

import os
import threading
import time
from typing import Iterator

import pandas as pd
from pyspark.sql.functions import pandas_udf

_pipelines: dict[tuple[str, str], object] = {}
_lock = threading.Lock()


def cached_pipeline(model_path: str, tokenizer_path: str, ledger_path: str):
    """The text-generation pipeline for this model, loaded at most once per process; each load
    appends a line to ``ledger_path`` so the driver can count loads across worker processes."""
    key = (model_path, tokenizer_path)
    with _lock:
        pipe = _pipelines.get(key)
        if pipe is None:
            import torch
            from transformers import pipeline

            started = time.perf_counter()
            device = 0 if torch.cuda.is_available() else "cpu"
            pipe = pipeline("text-generation", model=model_path, tokenizer=tokenizer_path, device=device)
            _pipelines[key] = pipe
            with open(ledger_path, "a", encoding="utf-8") as ledger:
                ledger.write(f"pid={os.getpid()} threads={torch.get_num_threads()} "
                             f"omp={os.environ.get('OMP_NUM_THREADS')} seconds={time.perf_counter() - started:.2f}\n")
    return pipe


RESULT_TYPE = "text string, prompt_tokens int, generated_tokens int"


def per_row_pipeline_udf(model_path: str, tokenizer_path: str, max_new_tokens: int, ledger_path: str):
    """A pandas UDF: prompt (the full prompt text) -> (text, prompt_tokens, generated_tokens),
    one pipeline call per row.

    The pipeline is asked for token ids rather than text, so the benchmark gets exact token
    counts (re-tokenizing decoded text miscounts, badly so for a random model's output); the
    text is decoded from them as the pipeline itself would, at no measurable cost.
    """

    @pandas_udf(RESULT_TYPE)
    def generate(batches: Iterator[pd.Series]) -> Iterator[pd.DataFrame]:
        pipe = cached_pipeline(model_path, tokenizer_path, ledger_path)
        for prompts in batches:
            texts, prompt_counts, generated_counts = [], [], []
            for prompt in prompts:
                output = pipe(prompt, max_new_tokens=max_new_tokens, do_sample=False, return_tensors=True)
                sequence = list(output[0]["generated_token_ids"])
                # The pipeline tokenizes the prompt with the tokenizer's defaults; so do we.
                prompt_length = len(pipe.tokenizer(prompt)["input_ids"])
                new_ids = sequence[prompt_length:]
                texts.append(pipe.tokenizer.decode(new_ids, skip_special_tokens=True))
                prompt_counts.append(prompt_length)
                generated_counts.append(len(new_ids))
            yield pd.DataFrame({"text": texts, "prompt_tokens": prompt_counts, "generated_tokens": generated_counts})

    return generate


def count_loads(ledger_path: str) -> int:
    """Pipeline loads recorded in ``ledger_path`` so far (0 when none)."""
    try:
        with open(ledger_path, encoding="utf-8") as ledger:
            return sum(1 for line in ledger if line.strip())
    except FileNotFoundError:
        return 0
