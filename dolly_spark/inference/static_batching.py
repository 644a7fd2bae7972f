"""The static backend: a micro-batch decodes as one left-padded batch over a preallocated KV
cache, after its prompts are prefilled in groups of similar length and, where every row starts
with the same tokens, after that shared prefix is prefilled once for all of them.

Cache layout of row r in a micro-batch whose longest prompt has L tokens, when r's prefill
group's longest prompt has G tokens and the rows share P prefix tokens:

    [ L - G padding | P shared prefix | G - len(r) padding | r's own tokens ]

Without a shared prefix (P = 0) that is plain left padding. Padding columns are masked out,
positions follow the mask, so every real token sits at the position it would have in a
one-row prompt and greedy answers are those of each row alone.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, ContextManager

import torch
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList, StaticCache

from dolly_spark.inference.devices import variable_shape_attention
from dolly_spark.inference.encoder import EncodedRow, has_sliding_window
from dolly_spark.inference.backend import Backend, cache_argument, generation_config
from dolly_spark.inference.packed_weights import packed_weights_for
from dolly_spark.inference.planner import prefill_groups, shared_prefix_length
from dolly_spark.inference.repetition import RepetitionControl
from dolly_spark.inference.ragged_attention import CacheLayout
from dolly_spark.request import Request

if TYPE_CHECKING:  # llguidance is imported only by engines that constrain answers
    from dolly_spark.inference.constrained import JsonGrammar

AttentionSwitch = Callable[[Any, CacheLayout], ContextManager[bool]]


class RowSeededSampler(LogitsProcessor):
    """Samples each row from its own generator, so a row's tokens depend on its seed only,
    not on which rows share its micro-batch. Returns one-hot scores that greedy decoding then
    follows."""

    def __init__(self, seeds: list[int], request: Request, device: torch.device):
        self.generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]
        self.request = request

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        logits = scores.float() / self.request.temperature
        if self.request.top_k > 0:
            kth = torch.topk(logits, min(self.request.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.request.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
            cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
            drop = cumulative - sorted_logits.softmax(dim=-1) >= self.request.top_p
            logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
        probs = logits.softmax(dim=-1)
        chosen = torch.cat(
            [torch.multinomial(probs[row], 1, generator=gen) for row, gen in enumerate(self.generators)]
        )
        one_hot = torch.full_like(scores, float("-inf"))
        one_hot[torch.arange(len(chosen)), chosen] = 0.0
        return one_hot


class StaticBatching(Backend):
    def __init__(self, *args: Any, grammar: JsonGrammar | None = None, **kwargs: Any):
        """``grammar``: every answer is constrained to it (see ``constrained.JsonGrammar``)."""
        super().__init__(*args, **kwargs)
        self.grammar = grammar
        self.cache_kwarg = cache_argument(self.model)
        # A sliding-window layer keeps only its last window of keys: a cache built here from
        # whole prompts would not fit it, so such models leave the whole prefill to generate.
        self.prefills_itself = not has_sliding_window(self.model.config)
        self.packed_weights = packed_weights_for(self.model)

    def generate(self, batch: list[EncodedRow], attention: AttentionSwitch) -> list[list[int]]:
        """``attention`` switches the model to the ragged decoding attention for one generate
        call (see ``dolly_spark.inference.ragged_attention``)."""
        longest = max(len(row.ids) for row in batch)
        prefix = (shared_prefix_length([row.ids for row in batch])
                  if self.config.reuse_prefix and self.prefills_itself else 0)
        ratio = self.config.min_length_ratio if self.prefills_itself else 0.0
        groups = [[batch[p] for p in group] for group in prefill_groups([len(row.ids) for row in batch], ratio)]
        input_ids, mask = (tensor.to(self.device) for tensor in self._laid_out(groups, longest, prefix))
        processors = LogitsProcessorList()
        if self.grammar is not None:  # first: repetition control never bans the grammar's only token
            processors.append(self.grammar.constraint(len(batch), longest))
        if self.request.controls_repetition:  # before sampling: it shapes what is sampled from
            processors.append(RepetitionControl(len(batch), longest, self.request.repetition_penalty,
                                                self.request.no_repeat_ngram_size,
                                                constrained=self.grammar is not None))
        if self.request.sampling:
            processors.append(RowSeededSampler([row.seed for row in batch], self.request, self.device))
        with torch.inference_mode(), variable_shape_attention(self.device):
            # Padding is computed like real tokens, and on a CPU, compute-bound at a few rows,
            # a prompt padded to twice its length costs twice as much. So prompts of similar
            # length are prefilled together, and the micro-batch then decodes as one batch:
            # decoding re-reads every weight per step, which a larger batch shares.
            cache = self._prefill(groups, input_ids, mask, prefix) if prefix or len(groups) > 1 else None
            config = generation_config(self.request.max_new_tokens, self.stop_ids, self.pad_id)
            if cache is None:
                # A preallocated cache: a growing one copies itself at every decoding step.
                config.cache_implementation = "static"
            with (attention(self.model, self._cache_layout(groups, longest, prefilled=cache is not None)),
                  self.packed_weights.decoding(len(batch), self.request.max_new_tokens)):
                output = self.model.generate(
                    input_ids=input_ids,
                    attention_mask=mask,
                    generation_config=config,
                    logits_processor=processors,
                    **({self.cache_kwarg: cache} if cache is not None else {}),
                )
        steps = output.shape[1] - longest
        self.stats.micro_batches.append((len(batch), longest))
        for group in groups:  # the batch is sorted longest first, and so is each group
            self.stats.prefill_groups.append((len(group), len(group[0].ids)))
            self.stats.padded_prompt_tokens += len(group) * len(group[0].ids)
        self.stats.reused_prefix_tokens += (len(batch) - 1) * prefix
        self.stats.generated_slots += len(batch) * steps
        return output[:, longest:].tolist()

    @staticmethod
    def _cache_layout(groups: list[list[EncodedRow]], longest: int, prefilled: bool) -> CacheLayout:
        """Each prefill group's live cache columns: its left padding and unwritten slots are
        skipped by the ragged attention. ``prefilled``: the cache holds every prompt token but
        the last; otherwise ``generate`` writes the whole prompt before the first decoding step."""
        runs, first = [], 0
        for group in groups:
            runs.append((first, first + len(group), longest - len(group[0].ids)))
            first += len(group)
        return CacheLayout(runs, written=longest - 1 if prefilled else longest)

    def _laid_out(self, groups: list[list[EncodedRow]], longest: int, prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask of the whole micro-batch, in the layout the module
        docstring draws."""
        rows = sum(len(group) for group in groups)
        input_ids = torch.full((rows, longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((rows, longest), dtype=torch.long)
        position = 0
        for group in groups:
            start = longest - len(group[0].ids)
            for row in group:
                own = len(row.ids) - prefix
                input_ids[position, start:start + prefix] = torch.tensor(row.ids[:prefix])
                input_ids[position, longest - own:] = torch.tensor(row.ids[prefix:])
                mask[position, start:start + prefix] = 1
                mask[position, longest - own:] = 1
                position += 1
        return input_ids, mask

    def _prefill(self, groups: list[list[EncodedRow]], input_ids: torch.Tensor, mask: torch.Tensor, prefix: int):
        """The KV cache of every prompt but its last token, laid out for ``longest - 1``
        positions, for ``generate`` to continue from: the shared prefix computed once, then each
        group's own tokens computed against it, read from the micro-batch's laid-out ``input_ids``
        and ``mask``. The cache is preallocated for the whole generation, so decoding steps write
        into it in place."""
        longest = input_ids.shape[1]
        prefix_states = self._prefix_states(groups[0][0].ids[:prefix]) if prefix else None
        # Each group's keys and values are written straight into the preallocated cache, which
        # starts zeroed (padding is masked out, but must be finite: a masked NaN still poisons
        # the sum). Nothing is laid out twice: the prefill's peak holds one cache, not two.
        cache = StaticCache(config=self.model.config, max_cache_len=longest - 1 + self.request.max_new_tokens)
        total_rows, first_row = sum(len(group) for group in groups), 0
        for group in groups:
            rows, shift = slice(first_row, first_row + len(group)), longest - len(group[0].ids)
            # From the group's first column: its prefix, then its rows' own tokens left-padded.
            group_states = self._group_states(input_ids[rows, shift + prefix:], mask[rows, shift:], prefix, prefix_states)
            if first_row == 0:
                keys, values = group_states[0]
                cache.early_initialization(total_rows, keys.shape[1], keys.shape[3], keys.dtype, keys.device)
            for layer, (keys, values) in zip(cache.layers, group_states):
                layer.keys[rows, :, shift:longest - 1] = keys
                layer.values[rows, :, shift:longest - 1] = values
            first_row += len(group)
        for layer in cache.layers:  # what update() counts: generate continues from column longest - 1
            layer.cumulative_length.fill_(longest - 1)
        return cache

    def _prefix_states(self, prefix_ids: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, the keys and values of the shared prefix, for one row."""
        ids = torch.tensor([prefix_ids], device=self.device)
        # Only the cache is wanted: logits_to_keep=1 skips the vocabulary projection of every
        # prompt position, a fifth of the prefill's FLOPs for a small model.
        out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1)
        return [(layer.keys, layer.values) for layer in getattr(out, self.cache_kwarg).layers]

    def _group_states(self, own_ids: torch.Tensor, mask: torch.Tensor, prefix: int,
                      prefix_states: list[tuple[torch.Tensor, torch.Tensor]] | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, the keys and values of a group's prompts but their last tokens: the shared
        prefix's, then ``own_ids``, each row's own tokens left-padded to the group's longest;
        ``mask`` covers both."""
        rows, own = own_ids.shape
        # Positions follow the attention mask, as generate numbers them, so the cached keys
        # sit where the decoding steps expect them.
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, prefix:]
        past = None
        if prefix_states is not None:
            past = DynamicCache()
            for index, (keys, values) in enumerate(prefix_states):
                past.update(keys.expand(rows, -1, -1, -1), values.expand(rows, -1, -1, -1), index)
            if own == 1:  # every row's own part is its last token, which generate feeds
                return [(layer.keys, layer.values) for layer in past.layers]
        out = self.model(input_ids=own_ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1],
                         use_cache=True, logits_to_keep=1, **({self.cache_kwarg: past} if past is not None else {}))
        return [(layer.keys, layer.values) for layer in getattr(out, self.cache_kwarg).layers]
