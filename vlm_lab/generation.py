"""Caption decoding for a CoCa model: greedy, sampling and beam search, with a KV cache.

The logits pipeline is transformers' (``LogitsProcessorList`` with ``MinLengthLogitsProcessor``,
``RepetitionPenaltyLogitsProcessor``, ``NoRepeatNGramLogitsProcessor``, ``TemperatureLogitsWarper``,
``TopKLogitsWarper``, ``TopPLogitsWarper``) and so are the stopping criteria of greedy/sampled decoding
(``MaxLengthCriteria``, ``EosTokenCriteria``), so the controls mean what they mean in
``model.generate`` of transformers. The loop itself is ours, because the model is not a transformers
model: each step runs the text tower and the multimodal decoder on the new token only, their
attention layers reading the earlier positions' keys and values from a :class:`DecodingCache` (the
same forward passes training runs, given a cache; ``use_cache=False`` recomputes the whole prefix each
step, the reference the cache is tested against). How to decode is one typed object, the config's
``model.generation`` section (``vlm_lab.schema.GenerationSettings``).

Sequences start with the tokenizer's BOS (``[CLS]`` for WordPiece) and end with its EOS (``[SEP]``);
rows that finish early are padded.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinLengthLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria, StoppingCriteriaList

from vlm_lab.errors import ConfigError
from vlm_lab.heads.coca import CocaCaptionHead, DecoderCache
from vlm_lab.schema import GenerationSettings
from vlm_lab.sharding import gathered_parameters
from vlm_lab.towers.clip_text import ClipTextTower
from vlm_lab.towers.kv_cache import KVCache


@dataclass(frozen=True)
class SpecialTokens:
    bos: int
    eos: int
    pad: int

    @classmethod
    def of(cls, tokenizer: Any) -> "SpecialTokens":
        """BOS/EOS of a tokenizer: its bos/eos tokens, else BERT's [CLS]/[SEP]."""
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        if bos is None or eos is None:
            raise ConfigError("generation: the tokenizer has neither bos/eos nor cls/sep tokens to start and end captions")
        return cls(bos, eos, pad)


@dataclass
class DecodingCache:
    """What incremental decoding keeps between steps: the text tower's keys and values and the decoder's."""

    text: KVCache = field(default_factory=KVCache)
    decoder: DecoderCache = field(default_factory=DecoderCache)

    @property
    def length(self) -> int:
        """Positions already encoded."""
        return self.text.length

    def reorder(self, index: torch.Tensor) -> None:
        """Keep the rows ``index`` (beam search: each surviving beam continues its parent's cache)."""
        self.text.reorder(index)
        self.decoder.reorder(index)


class CaptionGenerator:
    """Decodes captions from image tokens with a text tower and a :class:`CocaCaptionHead`."""

    def __init__(self, text: ClipTextTower, head: CocaCaptionHead, special: SpecialTokens) -> None:
        self.text, self.head, self.special = text, head, special

    @torch.no_grad()
    def generate(self, image_tokens: torch.Tensor, settings: GenerationSettings) -> torch.Tensor:
        """``[B, seq, dim]`` vision tower tokens -> ``[B, 1 + n]`` token ids (BOS first, padded after EOS)."""
        limit = self.text.max_length - 1
        if settings.max_new_tokens > limit:
            settings = replace(settings, max_new_tokens=limit, min_new_tokens=min(settings.min_new_tokens, limit))
        image = self.head.pool_caption(image_tokens)
        start = torch.full((len(image), 1), self.special.bos, dtype=torch.long, device=image.device)
        if settings.num_beams > 1:
            return self._beam_search(start, image, settings)
        return self._greedy_or_sample(start, image, settings)

    # -- one step -----------------------------------------------------------------------------------

    def _next_logits(self, ids: torch.Tensor, image: torch.Tensor, cache: DecodingCache | None) -> torch.Tensor:
        """Logits for the token after ``ids``; with a cache only the positions it lacks are computed."""
        if cache is None:
            return self.head.decode(self.text(ids).tokens, image)[:, -1].float()
        states = self.text(ids[:, cache.length:], cache=cache.text).tokens
        return self.head.decode(states, image, cache.decoder)[:, -1].float()

    def _processors(self, settings: GenerationSettings, sampling: bool) -> LogitsProcessorList:
        processors = LogitsProcessorList()
        if settings.min_new_tokens > 0:  # lengths count the BOS
            processors.append(MinLengthLogitsProcessor(1 + settings.min_new_tokens, self.special.eos))
        if settings.repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(settings.repetition_penalty, prompt_ignore_length=1))
        if settings.no_repeat_ngram_size > 0:  # the BOS counts, as in transformers: it occurs once per row
            processors.append(NoRepeatNGramLogitsProcessor(settings.no_repeat_ngram_size))
        if sampling:
            if settings.temperature != 1.0:
                processors.append(TemperatureLogitsWarper(settings.temperature))
            if settings.top_k > 0:
                processors.append(TopKLogitsWarper(settings.top_k))
            if settings.top_p < 1.0:
                processors.append(TopPLogitsWarper(settings.top_p))
        return processors

    # -- greedy and sampling ------------------------------------------------------------------------

    def _greedy_or_sample(self, ids: torch.Tensor, image: torch.Tensor, settings: GenerationSettings) -> torch.Tensor:
        processors = self._processors(settings, sampling=settings.do_sample)
        stopping = StoppingCriteriaList([MaxLengthCriteria(1 + settings.max_new_tokens),
                                         EosTokenCriteria(self.special.eos)])
        generator = None
        if settings.do_sample and settings.seed is not None:
            generator = torch.Generator(device=image.device).manual_seed(settings.seed)
        cache = DecodingCache() if settings.use_cache else None
        finished = torch.zeros(len(ids), dtype=torch.bool, device=ids.device)
        while True:
            scores = processors(ids, self._next_logits(ids, image, cache))
            if settings.do_sample:
                token = torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(1)
            else:
                token = scores.argmax(-1)
            token = token.masked_fill(finished, self.special.pad)
            ids = torch.cat([ids, token[:, None]], dim=1)
            finished |= stopping(ids, scores)
            if finished.all():
                return ids

    # -- beam search --------------------------------------------------------------------------------

    def _beam_search(self, start: torch.Tensor, image: torch.Tensor, settings: GenerationSettings) -> torch.Tensor:
        """Standard beam search (as transformers' with ``early_stopping=False``): each step keeps the
        ``num_beams`` best unfinished continuations; a continuation ending in EOS becomes a finished
        hypothesis scored ``sum log p / length ** length_penalty``; a row stops when its worst kept
        hypothesis beats the best running beam at the current length."""
        batch, beams = len(start), settings.num_beams
        processors = self._processors(settings, sampling=False)
        ids = start.repeat_interleave(beams, dim=0)
        image = image.repeat_interleave(beams, dim=0)
        cache = DecodingCache() if settings.use_cache else None
        beam_scores = torch.full((batch, beams), -float("inf"), device=ids.device)
        beam_scores[:, 0] = 0.0  # identical beams at the start: only the first may expand
        hypotheses: list[list[tuple[float, torch.Tensor]]] = [[] for _ in range(batch)]
        done = [False] * batch
        for step in range(1, settings.max_new_tokens + 1):
            logprobs = processors(ids, self._next_logits(ids, image, cache).log_softmax(-1))
            vocab = logprobs.shape[-1]
            candidates = (beam_scores.view(-1, 1) + logprobs).view(batch, beams * vocab)
            top_scores, top_index = candidates.topk(2 * beams, dim=1)
            next_scores = torch.full((batch, beams), -float("inf"), device=ids.device)
            next_tokens = torch.full((batch, beams), self.special.pad, dtype=torch.long, device=ids.device)
            next_parents = torch.arange(batch * beams, device=ids.device).view(batch, beams)
            for row in range(batch):
                if done[row]:
                    continue
                kept = 0
                for score, index in zip(top_scores[row].tolist(), top_index[row].tolist()):
                    parent, token = row * beams + index // vocab, index % vocab
                    if score == -float("inf"):
                        break
                    if token == self.special.eos:
                        if len(hypotheses[row]) < beams or score / step**settings.length_penalty > \
                                min(h[0] for h in hypotheses[row]):
                            self._add_hypothesis(hypotheses[row], score / step**settings.length_penalty,
                                                 torch.cat([ids[parent], ids.new_tensor([token])]), beams)
                        continue
                    next_scores[row, kept], next_tokens[row, kept], next_parents[row, kept] = score, token, parent
                    kept += 1
                    if kept == beams:
                        break
                best_running = next_scores[row].max().item() / step**settings.length_penalty
                if len(hypotheses[row]) == beams and min(h[0] for h in hypotheses[row]) >= best_running:
                    done[row] = True
            parents = next_parents.view(-1)
            ids = torch.cat([ids[parents], next_tokens.view(-1, 1)], dim=1)
            if cache is not None:
                cache.reorder(parents)
            beam_scores = next_scores
            if all(done):
                break
        length = ids.shape[1] - 1
        for row in range(batch):  # rows that ran out of length: their running beams compete too
            if not done[row]:
                for beam in range(beams):
                    score = beam_scores[row, beam].item()
                    if score > -float("inf"):
                        self._add_hypothesis(hypotheses[row], score / length**settings.length_penalty,
                                             ids[row * beams + beam], beams)
        best = [max(h, key=lambda pair: pair[0])[1] for h in hypotheses]
        out = torch.full((batch, max(len(b) for b in best)), self.special.pad, dtype=torch.long, device=ids.device)
        for row, sequence in enumerate(best):
            out[row, :len(sequence)] = sequence
        return out

    @staticmethod
    def _add_hypothesis(kept: list[tuple[float, torch.Tensor]], score: float, sequence: torch.Tensor,
                        beams: int) -> None:
        kept.append((score, sequence))
        if len(kept) > beams:
            kept.remove(min(kept, key=lambda pair: pair[0]))


def decode_captions(tokenizer: Any, ids: torch.Tensor, special: SpecialTokens) -> list[str]:
    """Token ids from :meth:`CaptionGenerator.generate` -> caption strings (cut at the first EOS)."""
    captions = []
    for row in ids.tolist():
        row = row[1:]
        if special.eos in row:
            row = row[:row.index(special.eos)]
        captions.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return captions


def generate_captions(module: Any, image_tokens: torch.Tensor, settings: GenerationSettings) -> list[str]:
    """Captions from a CoCa module's vision tokens ``[B, seq, dim]``, decoded as ``settings`` say
    (the module in eval mode meanwhile)."""
    if module.caption_head is None:
        raise ConfigError("generate: this model has no caption head (set model.caption_weight > 0 to build one)")
    special = SpecialTokens.of(module.tokenizer)
    was_training = module.training
    module.eval()
    try:
        # Incremental decoding runs the text tower's layers piece by piece, not through their forward:
        # under trainer.strategy=fsdp2 their parameters are gathered for the whole generation.
        with gathered_parameters(module.text, module.caption_head):
            ids = CaptionGenerator(module.text, module.caption_head, special).generate(image_tokens, settings)
    finally:
        module.train(was_training)
    return decode_captions(module.tokenizer, ids, special)
