"""Repetition control over each answer's own tokens, as a vLLM logits processor.

vLLM's ``repetition_penalty`` counts the prompt's tokens too, which keeps a summary from quoting
its input (see ``repetition``), and it has no n-gram ban. This processor applies the package's
two rules, with ``repetition.RepetitionControl``'s arithmetic, to the tokens a request has
generated so far. A request asks for it in ``SamplingParams.extra_args`` (``REPETITION_ARG``:
[penalty, n-gram size]); other requests pass through untouched.
"""
from __future__ import annotations

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

# Imported first thing by the engine processes vLLM spawns, as they unpickle this processor: they
# then end with the process that started them (see vllm_process).
from dolly_spark.inference import vllm_process  # noqa: F401
from dolly_spark.inference.repetition import REPETITION_ARG, penalized_scores


class AnswerRepetition(AdapterLogitsProcessor):
    @classmethod
    def validate_params(cls, params: SamplingParams):
        settings = (params.extra_args or {}).get(REPETITION_ARG)
        if settings is not None and (len(settings) != 2 or settings[0] <= 0 or settings[1] < 0):
            raise ValueError(f"{REPETITION_ARG} must be [repetition_penalty > 0, no_repeat_ngram_size >= 0], "
                             f"not {settings!r}")

    def is_argmax_invariant(self) -> bool:
        return False  # a penalty or a ban can change the likeliest token

    def new_req_logits_processor(self, params: SamplingParams):
        settings = (params.extra_args or {}).get(REPETITION_ARG)
        if settings is None:
            return None
        penalty, ngram_size = float(settings[0]), int(settings[1])

        def control(answer: list[int], logits: torch.Tensor) -> torch.Tensor:
            return penalized_scores(logits, answer, penalty, ngram_size)

        return control
