"""Caption evaluation under the COCO caption protocol (coco-caption / pycocoevalcap): BLEU-4 and CIDEr-D.

Each generated caption is scored against *all* reference captions of its image. Both sides are
tokenised as coco-caption does: Stanford PTBTokenizer (lower-cased), then its punctuation tokens
are removed. That tokenizer is Java; :func:`ptb_tokenize` reimplements the rules that matter for
captions in Python (lower-casing, splitting off punctuation and the clitics ``'s n't 're 've 'll 'd
'm``, keeping hyphenated words and abbreviations whole, brackets as ``-lrb-``..., dropping the same
punctuation list); it tokenises 35,449 of Flickr8k's 35,455 captions exactly as the Java tokenizer
does (the rest hold ``at&t``, ``slip 'n' slide`` and the like), so evaluation needs no Java.
:func:`bleu` and :func:`cider` are line-by-line ports of pycocoevalcap's ``BleuScorer``
(corpus BLEU, "closest" reference length) and ``CiderScorer`` (CIDEr-D: sigma 6, clipped tf-idf
n-grams 1-4, document frequencies from the references of the evaluated set, x10);
``tests/test_caption_metrics.py`` pins their values to pycocoevalcap 1.2's on fixed inputs.

Caption evaluation (``vlm_lab/eval/captioning.py``) uses the rest: :class:`CaptionScorer` collects
the captions of every rank and scores them, :func:`batch_references` and :func:`log_caption_examples`. The captions themselves
are decoded by ``vlm_lab/generation.py``.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter, defaultdict
from typing import Any, Mapping, Sequence

import torch

from vlm_lab.distributed import gather_strings, gather_uneven

# coco-caption's PTBTokenizer removes exactly these tokens after tokenising.
PUNCTUATIONS = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--",
                "...", ";"}
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_CLITICS = re.compile(r"(?<=\w)('s|'re|'ve|'ll|'d|'m|n't)\b")
# Quotes, brackets, commas...; a final period unless it ends an abbreviation such as "s.c.u.b.a.";
# a quote that starts a detached clitic ("horse 's") stays, as in PTB.
_SPLIT_OFF = re.compile(r"(\.\.\.|--|[,;:!?\"()\[\]{}]|(?<!\w)'(?!(?:s|re|ve|ll|d|m)\b)|'(?!\w)"
                        r"|(?<!\.\w)\.(?=\s|$))")


def ptb_tokenize(caption: str) -> str:
    """A caption as coco-caption's PTBTokenizer + punctuation removal leaves it: lower-case tokens, one space apart."""
    text = caption.lower().replace("\n", " ").replace("`", "'")
    text = re.sub(r"\bcannot\b", "can not", text)
    text = re.sub(r"\b(mr|mrs|ms|dr|jr|sr|st|[a-z])\.(?=\s|$)", r"\1<period>", text)  # abbreviations keep it
    text = _CLITICS.sub(r" \1", text)
    text = _SPLIT_OFF.sub(r" \1 ", text).replace("<period>", ".")
    tokens = []
    for token in text.split():
        if token in _BRACKETS:  # PTB writes -LRB- ...; lower-cased they escape the removal list, as in coco-caption
            tokens.append(_BRACKETS[token])
            continue
        if token == '"':  # PTB turns double quotes into `` and '', which are removed
            continue
        if token.endswith("-") and len(token) > 1 and token.strip("-"):  # trailing dash: "well-" -> "well -"
            token = token.rstrip("-")
        if token not in PUNCTUATIONS and token.strip("-"):
            tokens.append(token)
    return " ".join(tokens)


def _ngrams(words: Sequence[str], n: int) -> Counter:
    return Counter(tuple(words[i:i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def bleu(references: Mapping[Any, Sequence[str]], candidates: Mapping[Any, str], n: int = 4) -> list[float]:
    """Corpus BLEU-1..n of tokenised ``candidates`` (one per key) against ``references`` (pycocoevalcap's
    ``Bleu(4)`` with its default ``closest`` reference length)."""
    tiny, small = 1e-15, 1e-9
    test_len = ref_len = 0
    guess, correct = [0] * n, [0] * n
    for key, candidate in candidates.items():
        refs = [r.split() for r in references[key]]
        max_counts: dict[tuple[str, ...], int] = {}
        for ref in refs:
            for gram, count in _ngrams(ref, n).items():
                max_counts[gram] = max(max_counts.get(gram, 0), count)
        words = candidate.split()
        test_len += len(words)
        ref_len += min((abs(len(r) - len(words)), len(r)) for r in refs)[1]
        for k in range(n):
            guess[k] += max(0, len(words) - k)
        for gram, count in _ngrams(words, n).items():
            correct[len(gram) - 1] += min(max_counts.get(gram, 0), count)
    scores, product = [], 1.0
    for k in range(n):
        product *= (correct[k] + tiny) / (guess[k] + small)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (test_len + tiny) / (ref_len + small)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


def cider(references: Mapping[Any, Sequence[str]], candidates: Mapping[Any, str], n: int = 4,
          sigma: float = 6.0) -> float:
    """CIDEr-D of tokenised ``candidates`` against ``references`` (pycocoevalcap's ``Cider``)."""
    keys = list(candidates)
    ref_counts = {key: [_ngrams(r.split(), n) for r in references[key]] for key in keys}
    document_frequency: Counter = Counter()
    for counts in ref_counts.values():
        document_frequency.update({gram for c in counts for gram in c})
    log_images = math.log(float(len(keys)))

    def vector(counts: Counter) -> tuple[list[dict], list[float], int]:
        vec: list[dict] = [defaultdict(float) for _ in range(n)]
        norm, length = [0.0] * n, 0
        for gram, tf in counts.items():
            order = len(gram) - 1
            vec[order][gram] = float(tf) * (log_images - math.log(max(1.0, document_frequency[gram])))
            norm[order] += vec[order][gram] ** 2
            if order == 1:  # coco-caption measures length in bigrams
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    total = 0.0
    for key in keys:
        vec, norm, length = vector(_ngrams(candidates[key].split(), n))
        score = [0.0] * n
        for counts in ref_counts[key]:
            ref_vec, ref_norm, ref_length = vector(counts)
            delta = float(length - ref_length)
            for order in range(n):
                value = sum(min(v, ref_vec[order][g]) * ref_vec[order][g] for g, v in vec[order].items())
                if norm[order] != 0 and ref_norm[order] != 0:
                    value /= norm[order] * ref_norm[order]
                score[order] += value * math.e ** (-(delta**2) / (2 * sigma**2))
        total += sum(score) / n / len(ref_counts[key]) * 10.0
    return total / len(keys)


def caption_metrics(references: Mapping[Any, Sequence[str]], candidates: Mapping[Any, str]) -> dict[str, float]:
    """``bleu4`` and ``cider`` of raw caption strings under the COCO protocol (PTB tokenisation, all
    references), on pycocoevalcap's scale: BLEU in [0, 1] (papers print it x100), CIDEr as is."""
    refs = {k: [ptb_tokenize(r) for r in references[k]] for k in candidates}
    cands = {k: ptb_tokenize(c) for k, c in candidates.items()}
    return {"bleu4": bleu(refs, cands)[3], "cider": cider(refs, cands)}


class CaptionScorer:
    """Collects generated captions and references during an evaluation epoch, then scores them."""

    def __init__(self) -> None:
        self.candidates: dict[int, str] = {}
        self.references: dict[int, list[str]] = {}

    def add(self, image_ids: Sequence[int], captions: Sequence[str], references: Sequence[Sequence[str]]) -> None:
        for image_id, caption, refs in zip(image_ids, captions, references):
            self.candidates[int(image_id)] = caption
            self.references[int(image_id)] = list(refs)

    def __len__(self) -> int:
        return len(self.candidates)

    def compute(self, device: torch.device | str = "cpu") -> tuple[dict[str, float], list[tuple[int, str, list[str]]]]:
        """Metrics over every rank's captions (an image several ranks captioned, such as one a
        distributed sampler pads in, counts once), and the collected ``(image_id, caption,
        references)`` sorted by image id; clears the state. Every rank of a distributed run must call
        it: the captions travel as tensors (``gather_strings``; ``device`` must suit the backend)."""
        ids = list(self.candidates)
        counts = torch.tensor([len(self.references[i]) for i in ids], dtype=torch.long, device=device)
        all_ids = gather_uneven(torch.tensor(ids, dtype=torch.long, device=device)).tolist()
        all_counts = gather_uneven(counts).tolist()
        all_captions = gather_strings([self.candidates[i] for i in ids], device)
        all_references = gather_strings([r for i in ids for r in self.references[i]], device)
        self.candidates, self.references = {}, {}
        candidates: dict[int, str] = {}
        references: dict[int, list[str]] = {}
        start = 0
        for image_id, caption, count in zip(all_ids, all_captions, all_counts):
            candidates.setdefault(image_id, caption)
            references.setdefault(image_id, all_references[start:start + count])
            start += count
        rows = [(k, candidates[k], references[k]) for k in sorted(candidates)]
        return (caption_metrics(references, candidates) if candidates else {}), rows


def batch_references(batch: Mapping[str, Any], tokenizer: Any) -> list[list[str]]:
    """Each image's reference captions: the raw strings when the batch carries them (``captions``),
    else decoded from the token ids (lower-cased and possibly truncated: a fallback only)."""
    owners = batch["text_image_index"].tolist()
    texts = batch.get("captions")
    if texts is None:
        texts = tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)
    references: list[list[str]] = [[] for _ in range(len(batch["image_ids"]))]
    for owner, text in zip(owners, texts):
        references[owner].append(text)
    return references


def log_caption_examples(module: Any, stage: str, rows: Sequence[tuple[int, str, list[str]]]) -> None:
    """Show a few generated captions beside a reference: in the log, and as text in TensorBoard/W&B
    when such a logger is attached."""
    lines = [f"image {image_id}: {caption!r} (reference: {refs[0]!r})" for image_id, caption, refs in rows]
    if not lines:
        return
    logging.getLogger(__name__).info("%s captions:\n  %s", stage, "\n  ".join(lines))
    trainer = getattr(module, "_trainer", None)
    for logger in (trainer.loggers if trainer is not None else ()):
        experiment = getattr(logger, "experiment", None)
        if hasattr(experiment, "add_text"):  # TensorBoard
            experiment.add_text(f"{stage}/captions", "\n\n".join(lines), global_step=trainer.global_step)
        elif hasattr(logger, "log_text"):  # W&B
            logger.log_text(key=f"{stage}/captions", columns=["image_id", "caption", "reference"],
                            data=[[i, c, r[0]] for i, c, r in rows])
