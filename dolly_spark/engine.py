"""The instruction engine: prompts in, one structured result per row out, batched on the model.

Runs without Spark. ``InstructionEngine.run`` guards prompt lengths, sorts rows by token
length, cuts micro-batches under a token budget, generates with left padding and the KV cache,
stops on the stop key and EOS, parses each answer at token level and restores input order.
Bad input never raises: the row gets an error result and the rest of the batch is unaffected.
"""
from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from dolly_spark.devices import is_out_of_memory, select_device, select_dtype
from dolly_spark.prompts import (
    PromptFormat,
    dolly_key_ids,
    encode_segments,
    eos_token_ids,
    get_format,
    has_context,
    infer_format_name,
)
from dolly_spark.ragged_attention import CacheLayout, ragged_attention

log = logging.getLogger(__name__)

FINISH_STOP, FINISH_EOS, FINISH_LENGTH, FINISH_ERROR = "stop", "eos", "length", "error"
STRATEGIES = ("static", "continuous")


@dataclass(frozen=True)
class GenerationSettings:
    """How the engine generates.

    ``token_budget`` bounds each micro-batch: rows × (longest prompt + max_new_tokens), the
    tokens its KV cache holds at the end. Within a micro-batch, prompts are prefilled in groups
    of similar length: a row shorter than ``min_length_ratio`` of its group's longest prompt
    starts a new group (0 prefills the micro-batch as one group); then the whole micro-batch
    decodes together. ``on_overlong``: "truncate" cuts the context from its
    end and flags the row; "error" answers the row with an error instead.
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    token_budget: int = 16384
    max_batch_rows: int = 64
    min_length_ratio: float = 0.75
    on_overlong: str = "truncate"
    strategy: str = "static"

    def __post_init__(self):
        if self.on_overlong not in ("truncate", "error"):
            raise ValueError(f"on_overlong must be 'truncate' or 'error', not {self.on_overlong!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, not {self.strategy!r}")
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(
                f"need temperature >= 0, 0 < top_p <= 1 and top_k >= 0 (0: off); got temperature="
                f"{self.temperature}, top_p={self.top_p}, top_k={self.top_k}"
            )

    @property
    def sampling(self) -> bool:
        return self.temperature > 0


@dataclass
class InstructionResult:
    """What one row gets: the answer, or the reason there is none."""

    response: str | None
    finish_reason: str
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    truncated: bool = False


@dataclass
class EngineStats:
    """Counters over every ``run`` of an engine, for logs and benchmarks."""

    rows: int = 0
    micro_batches: list[tuple[int, int]] = field(default_factory=list)  # (rows, longest prompt), decoded together
    prefill_groups: list[tuple[int, int]] = field(default_factory=list)  # (rows, padded prompt length)
    prompt_tokens: int = 0
    padded_prompt_tokens: int = 0
    completion_tokens: int = 0
    generated_slots: int = 0  # rows × decoding steps, finished rows included
    generate_seconds: float = 0.0

    @property
    def padding_waste(self) -> float:
        """Padded tokens processed per real token (1.0 means no padding at all)."""
        real = self.prompt_tokens + self.completion_tokens
        return (self.padded_prompt_tokens + self.generated_slots) / real if real else 0.0


@dataclass
class _Prepared:
    index: int
    ids: list[int]
    truncated: bool
    seed: int


class _RowSeededSampler(LogitsProcessor):
    """Samples each row from its own generator, so a row's tokens depend on its seed only,
    not on which rows share its micro-batch. Returns one-hot scores that greedy decoding then
    follows."""

    def __init__(self, seeds: list[int], settings: GenerationSettings, device: torch.device):
        self.generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]
        self.settings = settings

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        logits = scores.float() / self.settings.temperature
        if self.settings.top_k > 0:
            kth = torch.topk(logits, min(self.settings.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.settings.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
            cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
            drop = cumulative - sorted_logits.softmax(dim=-1) >= self.settings.top_p
            logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
        probs = logits.softmax(dim=-1)
        chosen = torch.cat(
            [torch.multinomial(probs[row], 1, generator=gen) for row, gen in enumerate(self.generators)]
        )
        one_hot = torch.full_like(scores, float("-inf"))
        one_hot[torch.arange(len(chosen)), chosen] = 0.0
        return one_hot


def row_seed(base_seed: int, key: Any) -> int:
    """A 63-bit seed derived from a row's key, stable across processes and retries."""
    digest = hashlib.sha256(f"{base_seed}:{key}".encode()).hexdigest()
    return int(digest[:15], 16)


def context_window(model: Any, tokenizer: Any) -> int:
    """The longest sequence the model takes, from its config or, failing that, its tokenizer."""
    config = model.config
    for attribute in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, attribute, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 10**7:
        return limit
    raise ValueError("cannot tell the model's context window; set max_position_embeddings in its config")


class InstructionEngine:
    """Runs instructions (with optional contexts) through a causal LM in token-budgeted batches."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        prompt_format: str | PromptFormat | None = None,
        settings: GenerationSettings | None = None,
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.settings = settings or GenerationSettings()
        if prompt_format is None or prompt_format == "auto":
            prompt_format = infer_format_name(tokenizer)
        self.format = get_format(prompt_format, tokenizer) if isinstance(prompt_format, str) else prompt_format
        self.device = next(model.parameters()).device
        self.max_prompt_tokens = context_window(model, tokenizer) - self.settings.max_new_tokens
        if self.max_prompt_tokens < 1:
            raise ValueError(
                f"max_new_tokens={self.settings.max_new_tokens} leaves no room for a prompt in the "
                f"model's context window of {context_window(model, tokenizer)} tokens"
            )
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.key_stop_ids = dolly_key_ids(tokenizer) if self.format.name == "dolly" else set()
        self.eos_ids = eos_token_ids(model, tokenizer)
        self.stats = EngineStats()
        self._strategy = self.settings.strategy

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        prompt_format: str | PromptFormat | None = None,
        settings: GenerationSettings | None = None,
        gpu_index: int | None = None,
        tokenizer_path: str | None = None,
        dtype: str | None = None,
    ) -> "InstructionEngine":
        """Load a checkpoint (a local directory or a hub id) onto the best device available, in
        ``dtype`` or the device's default (see ``devices.select_dtype``)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        device = select_device(gpu_index)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=select_dtype(device, dtype)).to(device)
        return cls(model, tokenizer, prompt_format, settings)

    @property
    def stop_ids(self) -> list[int]:
        return sorted(self.eos_ids | self.key_stop_ids)

    # ----------------------------------------------------------------------------------------
    def run(
        self,
        instructions: Sequence[str | None],
        contexts: Sequence[str | None] | None = None,
        keys: Sequence[Any] | None = None,
        require_context: bool = False,
    ) -> list[InstructionResult]:
        """One result per instruction, in input order. Never raises for bad rows.

        With ``require_context`` a row whose context is null or blank gets an error result
        (the caller named an input column and the row has no input) instead of a prompt
        without an ``Input:`` block.
        """
        count = len(instructions)
        contexts = list(contexts) if contexts is not None else [None] * count
        if len(contexts) != count or (keys is not None and len(keys) != count):
            raise ValueError("instructions, contexts and keys must have the same length")
        results: list[InstructionResult | None] = [None] * count
        prepared: list[_Prepared] = []
        for index in range(count):
            key = keys[index] if keys is not None else None
            if require_context and not (isinstance(contexts[index], str) and has_context(contexts[index])):
                what = "null" if not isinstance(contexts[index], str) else "empty"
                results[index] = InstructionResult(None, FINISH_ERROR, error=f"input is {what}; nothing to work on")
                continue
            outcome = self._prepare(index, instructions[index], contexts[index], key)
            if isinstance(outcome, InstructionResult):
                results[index] = outcome
            else:
                prepared.append(outcome)

        started = time.perf_counter()
        batches = self.micro_batches(prepared)
        for batch in batches:
            for row, result in zip(batch, self._generate_or_split(batch)):
                results[row.index] = result
        seconds = time.perf_counter() - started
        self.stats.generate_seconds += seconds
        self.stats.rows += count
        generated = sum(r.completion_tokens for r in results if r is not None)
        log.info("%d rows (%d generated, %d answered with an error before generation) in %d micro-batches: "
                 "%d tokens in %.1fs", count, len(prepared), count - len(prepared), len(batches), generated, seconds)
        return results  # type: ignore[return-value]

    def micro_batches(self, prepared: list[_Prepared]) -> list[list[_Prepared]]:
        """Rows sorted longest first and cut so rows × (longest prompt + max_new_tokens) stays
        within the token budget; a single row over the budget goes alone."""
        settings = self.settings
        batches: list[list[_Prepared]] = []
        current: list[_Prepared] = []
        for row in sorted(prepared, key=lambda item: len(item.ids), reverse=True):
            longest = len(current[0].ids) if current else len(row.ids)
            footprint = (len(current) + 1) * (longest + settings.max_new_tokens)
            if current and (footprint > settings.token_budget or len(current) >= settings.max_batch_rows):
                batches.append(current)
                current = []
            current.append(row)
        if current:
            batches.append(current)
        return batches

    def prefill_groups(self, batch: list[_Prepared]) -> list[list[_Prepared]]:
        """A micro-batch (longest first) cut into runs whose rows are at least
        ``min_length_ratio`` as long as the run's first."""
        groups: list[list[_Prepared]] = []
        for row in batch:
            if groups and len(row.ids) >= self.settings.min_length_ratio * len(groups[-1][0].ids):
                groups[-1].append(row)
            else:
                groups.append([row])
        return groups

    # ----------------------------------------------------------------------------------------
    def _prepare(self, index: int, instruction: Any, context: Any, key: Any) -> _Prepared | InstructionResult:
        if not isinstance(instruction, str) or not instruction.strip():
            what = "null" if instruction is None or not isinstance(instruction, str) else "empty"
            return InstructionResult(None, FINISH_ERROR, error=f"instruction is {what}; nothing to answer")
        context = context if isinstance(context, str) and has_context(context) else None
        ids = encode_segments(self.tokenizer, self.format.prompt_segments(instruction, context))
        truncated = False
        if len(ids) > self.max_prompt_tokens:
            if self.settings.on_overlong == "error" or context is None:
                return self._overlong(len(ids), context is not None)
            length = len(ids)
            ids = self._truncate_context(instruction, context)
            truncated = True
            if ids is None:
                return self._overlong(length, False)
        seed_key = key if key is not None else f"{instruction}\x00{context}"
        return _Prepared(index, ids, truncated, row_seed(self.settings.seed, seed_key))

    def _overlong(self, length: int, has_ctx: bool) -> InstructionResult:
        hint = "shorten the input or raise the limit" if has_ctx else "the instruction alone is too long"
        return InstructionResult(
            None, FINISH_ERROR, prompt_tokens=length,
            error=(f"prompt has {length} tokens, over the {self.max_prompt_tokens} that fit "
                   f"(context window minus max_new_tokens={self.settings.max_new_tokens}); {hint}"),
        )

    def _truncate_context(self, instruction: str, context: str) -> list[int] | None:
        """Cut the context from its end until the prompt fits; None when even no context is too long."""
        # A token spans at least one character in practice, so this pre-cut never drops text
        # that could fit and keeps tokenizing a 200,000-character context cheap.
        context = context[: self.max_prompt_tokens * 16]
        context_ids = self.tokenizer(context, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        keep = min(len(context_ids), self.max_prompt_tokens)
        while keep > 0:
            cut = self.tokenizer.decode(context_ids[:keep])
            ids = encode_segments(self.tokenizer, self.format.prompt_segments(instruction, cut))
            if len(ids) <= self.max_prompt_tokens:
                return ids
            keep -= len(ids) - self.max_prompt_tokens
        return None

    # ----------------------------------------------------------------------------------------
    def _generate_or_split(self, batch: list[_Prepared]) -> list[InstructionResult]:
        """Generate a micro-batch; on failure (GPU out-of-memory above all) split it in halves and
        retry, so only a row that fails on its own gets an error."""
        try:
            return self._generate(batch)
        except Exception as exc:  # noqa: BLE001 - a row's failure must not end the job
            if is_out_of_memory(exc) and torch.cuda.is_available():
                torch.cuda.empty_cache()
            if len(batch) == 1:
                log.warning("row %d failed: %s", batch[0].index, exc)
                return [InstructionResult(None, FINISH_ERROR, error=f"{type(exc).__name__}: {exc}",
                                          prompt_tokens=len(batch[0].ids), truncated=batch[0].truncated)]
            log.warning("micro-batch of %d rows failed (%s); splitting and retrying", len(batch), exc)
            half = len(batch) // 2
            return self._generate_or_split(batch[:half]) + self._generate_or_split(batch[half:])

    def _generate(self, batch: list[_Prepared]) -> list[InstructionResult]:
        if self._strategy == "continuous" and not self.settings.sampling:
            try:
                generated = self._generate_continuous(batch)
            except Exception as exc:  # noqa: BLE001 - unsupported architectures fall back
                if is_out_of_memory(exc):
                    raise
                log.warning("continuous batching failed (%s); falling back to static batching", exc)
                self._strategy = "static"
                generated = self._generate_static(batch)
        else:
            generated = self._generate_static(batch)
        return [self._parse(row, tokens) for row, tokens in zip(batch, generated)]

    def _generation_config(self) -> GenerationConfig:
        return GenerationConfig(
            max_new_tokens=self.settings.max_new_tokens,
            do_sample=False,
            eos_token_id=self.stop_ids,
            pad_token_id=self.pad_id,
            use_cache=True,
            # Every micro-batch has its own shape; compiling the forward for the preallocated
            # cache (what generate does on a GPU by default) would recompile again and again.
            disable_compile=True,
        )

    def _generate_static(self, batch: list[_Prepared]) -> list[list[int]]:
        longest = max(len(row.ids) for row in batch)
        input_ids, attention = self._left_padded(batch, longest)
        processors = LogitsProcessorList()
        if self.settings.sampling:
            processors.append(_RowSeededSampler([row.seed for row in batch], self.settings, self.device))
        groups = self.prefill_groups(batch)
        with torch.inference_mode():
            # Padding is computed like real tokens, and on a CPU, compute-bound at a few rows,
            # a prompt padded to twice its length costs twice as much. So prompts of similar
            # length are prefilled together, and the micro-batch then decodes as one batch:
            # decoding re-reads every weight per step, which a larger batch shares.
            cache = self._prefill(groups, longest) if len(groups) > 1 else None
            config = self._generation_config()
            if cache is None:
                # A preallocated cache: a growing one copies itself at every decoding step.
                config.cache_implementation = "static"
            with ragged_attention(self.model, self._cache_layout(groups, longest, prefilled=cache is not None)):
                output = self.model.generate(
                    input_ids=input_ids.to(self.device),
                    attention_mask=attention.to(self.device),
                    generation_config=config,
                    logits_processor=processors,
                    **({"cache": cache} if cache is not None else {}),
                )
        steps = output.shape[1] - longest
        self.stats.micro_batches.append((len(batch), longest))
        for group in groups:  # the batch is sorted longest first, and so is each group
            self.stats.prefill_groups.append((len(group), len(group[0].ids)))
            self.stats.padded_prompt_tokens += len(group) * len(group[0].ids)
        self.stats.generated_slots += len(batch) * steps
        return output[:, longest:].tolist()

    @staticmethod
    def _cache_layout(groups: list[list[_Prepared]], longest: int, prefilled: bool) -> CacheLayout:
        """Each prefill group's live cache columns: its left padding and unwritten slots are
        skipped by the ragged attention. ``prefilled``: the cache holds every prompt token but
        the last; otherwise ``generate`` writes the whole prompt before the first decoding step."""
        runs, first = [], 0
        for group in groups:
            runs.append((first, first + len(group), longest - len(group[0].ids)))
            first += len(group)
        return CacheLayout(runs, written=longest - 1 if prefilled else longest)

    def _left_padded(self, rows: list[_Prepared], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        input_ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), length), dtype=torch.long)
        for position, row in enumerate(rows):
            input_ids[position, length - len(row.ids):] = torch.tensor(row.ids)
            attention[position, length - len(row.ids):] = 1
        return input_ids, attention

    def _prefill(self, groups: list[list[_Prepared]], longest: int):
        """The KV cache of every prompt but its last token, computed group by group and
        left-padded to ``longest - 1`` positions, for ``generate`` to continue from. The cache
        is preallocated for the whole generation, so decoding steps write into it in place."""
        from transformers import StaticCache

        # Per layer, the keys and values of every row, left-padded to ``longest - 1`` positions:
        # each group's states are copied once into their rows, nothing is padded or concatenated.
        layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        total_rows, first_row = sum(len(group) for group in groups), 0
        for group in groups:
            length = len(group[0].ids)
            ids, mask = self._left_padded(group, length)
            ids, mask = ids.to(self.device), mask.to(self.device)
            # Positions follow the attention mask, as generate numbers them, so the cached keys
            # sit where the decoding steps expect them.
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            # Only the cache is wanted: logits_to_keep=1 skips the vocabulary projection of every
            # prompt position, a fifth of the prefill's FLOPs for a small model.
            out = self.model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1],
                             use_cache=True, logits_to_keep=1)
            rows, shift = slice(first_row, first_row + len(group)), longest - length
            for index, layer in enumerate(out.past_key_values.layers):
                if len(layers) <= index:  # first group: allocate the layer's padded states
                    layers.append(tuple(states.new_empty((total_rows, states.shape[1], longest - 1, states.shape[3]))
                                        for states in (layer.keys, layer.values)))
                for padded, states in zip(layers[index], (layer.keys, layer.values)):
                    # Padding is masked out, but must be finite: a masked NaN still poisons the sum.
                    padded[rows, :, :shift] = 0
                    padded[rows, :, shift:] = states
            first_row += len(group)
        cache = StaticCache(config=self.model.config, max_cache_len=longest - 1 + self.settings.max_new_tokens)
        for index, (keys, values) in enumerate(layers):
            cache.update(keys, values, index)
        return cache

    def _generate_continuous(self, batch: list[_Prepared]) -> list[list[int]]:
        config = self._generation_config()
        with torch.inference_mode():
            # Warm-up captures CUDA graphs; on the CPU it only costs time.
            outputs = self.model.generate_batch(inputs=[row.ids for row in batch], generation_config=config,
                                                progress_bar=False, warmup=self.device.type == "cuda")
        ordered = sorted(outputs.values(), key=lambda out: int(str(out.request_id).rsplit("_", 1)[-1]))
        failed = [out.error for out in ordered if out.error is not None]
        if failed or len(ordered) != len(batch):
            # The manager logs and swallows errors per request; surface them so we fall back.
            raise RuntimeError(f"continuous batching failed for {len(failed) or len(batch)} rows: {failed[:1]}")
        tokens = [list(out.generated_tokens) for out in ordered]
        self.stats.micro_batches.append((len(batch), max(len(row.ids) for row in batch)))
        self.stats.prefill_groups += [(1, len(row.ids)) for row in batch]
        self.stats.padded_prompt_tokens += sum(len(row.ids) for row in batch)
        self.stats.generated_slots += sum(len(t) for t in tokens)
        return tokens

    def _parse(self, row: _Prepared, tokens: list[int]) -> InstructionResult:
        """The answer between the prompt's response key and the first stop token; a stop key the
        model spelled out as plain text also ends it."""
        finish, kept = FINISH_LENGTH, tokens
        for position, token in enumerate(tokens):
            if token in self.key_stop_ids:
                finish, kept = FINISH_STOP, tokens[:position]
                break
            if token in self.eos_ids:
                finish, kept = FINISH_EOS, tokens[:position]
                break
        completion_tokens = len(kept) + (0 if finish == FINISH_LENGTH else 1)
        # Stop tokens after the first are padding of a finished row, not generated text.
        text = self.tokenizer.decode(kept, skip_special_tokens=True)
        for stop in self.format.stop_strings():
            if stop in text:
                text, finish = text.split(stop, 1)[0], FINISH_STOP
        text = text.strip()
        self.stats.prompt_tokens += len(row.ids)
        self.stats.completion_tokens += completion_tokens
        if not text:
            return InstructionResult(None, finish, error=f"empty response: the model produced no text before '{finish}'",
                                     prompt_tokens=len(row.ids), completion_tokens=completion_tokens,
                                     truncated=row.truncated)
        return InstructionResult(text, finish, None, len(row.ids), completion_tokens, row.truncated)
