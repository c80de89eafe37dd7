"""BLEU-4 and CIDEr-D under the COCO caption protocol, pinned to pycocoevalcap 1.2's values."""

import pytest

from vlm_lab.eval.caption_metrics import CaptionScorer, bleu, caption_metrics, cider, ptb_tokenize

REFERENCES = {
    1: ["a dog runs on the grass", "a brown dog is running through a field", "the dog plays outside"],
    2: ["two children play on the beach", "kids are playing in the sand", "two kids at the beach"],
    3: ["a man rides a bike down a hill", "a cyclist on a mountain road", "a person riding a bicycle"],
}
CANDIDATES = {1: "a brown dog is running through the grass", 2: "two kids play in the sand", 3: "a man riding a bike"}


def test_bleu_matches_pycocoevalcap():
    # pycocoevalcap 1.2: Bleu(4).compute_score(REFERENCES, {k: [v]}) on these inputs.
    expected = [0.9999999998947368, 0.866025403689005, 0.6607380314291551, 0.5423782837036831]
    assert bleu(REFERENCES, CANDIDATES) == pytest.approx(expected, rel=1e-9)


def test_cider_matches_pycocoevalcap():
    # pycocoevalcap 1.2: Cider().compute_score(REFERENCES, {k: [v]}) on these inputs.
    assert cider(REFERENCES, CANDIDATES) == pytest.approx(2.155857714119106, rel=1e-9)


@pytest.mark.parametrize("raw, tokens", [
    ("A dog , running in the grass .", "a dog running in the grass"),
    ("A girl holding a horse's lead.", "a girl holding a horse 's lead"),
    ("A girl holding a horse 's lead .", "a girl holding a horse 's lead"),
    ("We cannot see the girl in the T-shirt !", "we can not see the girl in the t-shirt"),
    ("A dog (brown) jumps; \"wow\"", "a dog -lrb- brown -rrb- jumps wow"),  # coco-caption keeps -lrb-
    ("Mr. Potato Head and a S.C.U.B.A. diver", "mr. potato head and a s.c.u.b.a. diver"),
    ("He doesn't swim...", "he does n't swim"),
])
def test_ptb_tokenization_follows_the_java_tokenizer(raw, tokens):
    # Expected strings are what pycocoevalcap's PTBTokenizer (Stanford CoreNLP 3.4.1) produced.
    assert ptb_tokenize(raw) == tokens


def test_scorer_uses_all_references_and_raw_strings():
    scorer = CaptionScorer()
    scorer.add([2, 1], ["Two kids play in the sand.", "A brown dog is running through the grass!"],
               [REFERENCES[2], REFERENCES[1]])
    scorer.add([3], ["a man riding a bike"], [REFERENCES[3]])
    metrics, rows = scorer.compute()
    assert metrics == pytest.approx(caption_metrics(REFERENCES, CANDIDATES))
    assert metrics["bleu4"] == pytest.approx(0.5423782837036831, rel=1e-9)
    assert [r[0] for r in rows] == [1, 2, 3] and len(scorer) == 0
