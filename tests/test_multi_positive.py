"""Multi-positive contrastive losses (``model.loss.multi_positive``): pairs of one image are positives.

Against hand-computed values on a batch with two captions of one image, for CLIP, ALIGN and
SigLIP; bit-for-bit equal to the one-positive loss when no image repeats; the module passes the
batch's image ids, also to the chunked step (gradient caching). The two-process equality is in
``tests/test_distributed.py`` (its ``*_multi`` cases).
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))

import vlm_lab  # noqa: E402
from test_distributed import _batch  # noqa: E402
from test_gradient_cache import assert_same_step, build, step  # noqa: E402
from vlm_lab.cli import main  # noqa: E402
from vlm_lab.losses import AlignLoss, ClipLoss, SigLipLoss  # noqa: E402

TINY = TESTS / "configs" / "tiny.yaml"

# Three unit-norm pairs; pairs 0 and 2 are two captions of image 5.
IMAGES = [[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]
TEXTS = [[0.8, 0.6], [0.0, 1.0], [1.0, 0.0]]
IDS = [5, 9, 5]


def _sims() -> list[list[float]]:
    """Image i . text j, written out."""
    return [[sum(a * b for a, b in zip(image, text)) for text in TEXTS] for image in IMAGES]


def _soft_cross_entropy(logits: list[float], target: list[float], smoothing: float = 0.0) -> float:
    """-sum_c q_c log p_c with q = (1 - e) * target + e / C."""
    log_z = math.log(sum(math.exp(x) for x in logits))
    q = [(1 - smoothing) * t + smoothing / len(logits) for t in target]
    return sum(qc * (log_z - x) for qc, x in zip(q, logits))


def _targets() -> list[list[float]]:
    """Row i: uniform over the pairs whose image is pair i's."""
    rows = [[1.0 if a == b else 0.0 for b in IDS] for a in IDS]
    return [[v / sum(row) for v in row] for row in rows]


def _symmetric_reference(scale: float, smoothing: float = 0.0) -> float:
    sims, targets, n = _sims(), _targets(), len(IDS)
    image_loss = sum(_soft_cross_entropy([scale * s for s in sims[i]], targets[i], smoothing) for i in range(n)) / n
    text_loss = sum(_soft_cross_entropy([scale * sims[i][j] for i in range(n)], targets[j], smoothing)
                    for j in range(n)) / n
    return (image_loss + text_loss) / 2


def _tensors(dtype=torch.float64):
    return torch.tensor(IMAGES, dtype=dtype), torch.tensor(TEXTS, dtype=dtype), torch.tensor(IDS)


def _set(param: torch.nn.Parameter, value: float) -> None:
    with torch.no_grad():
        param.fill_(value)


def test_clip_matches_hand_computed_multi_positive_loss():
    loss = ClipLoss(multi_positive=True).double()
    _set(loss.logit_scale, math.log(3.0))
    images, texts, ids = _tensors()
    assert loss(images, texts, image_ids=ids).item() == pytest.approx(_symmetric_reference(3.0), abs=1e-12)
    # The control: the one-positive loss on the same batch is another number.
    one_positive = ClipLoss().double()
    _set(one_positive.logit_scale, math.log(3.0))
    assert one_positive(images, texts).item() != pytest.approx(_symmetric_reference(3.0), abs=1e-3)


def test_align_matches_hand_computed_multi_positive_loss_with_smoothing():
    loss = AlignLoss(label_smoothing=0.1, multi_positive=True).double()
    _set(loss.temperature, 0.5)
    images, texts, ids = _tensors()
    expected = _symmetric_reference(2.0, smoothing=0.1)
    assert loss(images, texts, image_ids=ids).item() == pytest.approx(expected, abs=1e-12)


def test_siglip_matches_hand_computed_multi_positive_loss():
    loss = SigLipLoss(multi_positive=True).double()
    _set(loss.logit_scale, math.log(4.0))
    _set(loss.logit_bias, -2.0)
    images, texts, ids = _tensors()
    sims, n = _sims(), len(IDS)
    expected = -sum(-math.log1p(math.exp(-(1 if IDS[i] == IDS[j] else -1) * (4.0 * sims[i][j] - 2.0)))
                    for i in range(n) for j in range(n)) / n
    assert loss(images, texts, image_ids=ids).item() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("make", [lambda **k: ClipLoss(**k), lambda **k: ClipLoss(local_loss=False, **k),
                                  lambda **k: AlignLoss(**k), lambda **k: SigLipLoss(**k),
                                  lambda **k: SigLipLoss(exchange="neighbour", **k)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_without_repeated_images_it_is_todays_loss_bit_for_bit(make, dtype):
    gen = torch.Generator().manual_seed(3)
    images = torch.nn.functional.normalize(torch.randn(8, 6, generator=gen, dtype=dtype), dim=-1)
    texts = torch.nn.functional.normalize(torch.randn(8, 6, generator=gen, dtype=dtype), dim=-1)
    ids = torch.tensor([40, 3, 17, 8, 99, 0, 5, 12])  # any ids, none twice

    def loss_and_grads(loss, **ids_):
        image, text = images.clone().requires_grad_(), texts.clone().requires_grad_()
        value = loss(image, text, **ids_)
        value.backward()
        return value.detach(), image.grad, text.grad, [p.grad for p in loss.parameters()]

    expected = loss_and_grads(make())
    actual = loss_and_grads(make(multi_positive=True), image_ids=ids)
    assert torch.equal(expected[0], actual[0])
    for a, b in zip(expected[1:3] + tuple(expected[3]), actual[1:3] + tuple(actual[3])):
        assert torch.equal(a, b)
    # ...and a repeated image changes it (the comparison can fail).
    repeated = make(multi_positive=True)(images, texts, image_ids=torch.tensor([40, 3, 17, 8, 99, 0, 5, 40]))
    assert not torch.equal(repeated.detach(), expected[0])


def test_all_pairs_of_one_image_is_a_uniform_target_over_the_batch():
    # Every pair from one image: each row's target is uniform, so CLIP's loss is log(B) minus the
    # mean logit deviation, whatever the features; with equal features exactly log(B).
    features = torch.nn.functional.normalize(torch.ones(4, 3, dtype=torch.float64), dim=-1)
    loss = ClipLoss(multi_positive=True).double()
    assert loss(features, features, image_ids=torch.zeros(4, dtype=torch.long)).item() == pytest.approx(math.log(4))


def test_identical_image_features_make_the_softmax_losses_agree_but_not_siglip():
    # Two captions of one image with the same image features (a locked tower, no augmentation): the two
    # equal rows' one-positive cross-entropies sum to their multi-positive ones, in both directions.
    gen = torch.Generator().manual_seed(5)
    images = torch.nn.functional.normalize(torch.randn(6, 8, generator=gen, dtype=torch.float64), dim=-1)
    images[2] = images[0]
    texts = torch.nn.functional.normalize(torch.randn(6, 8, generator=gen, dtype=torch.float64), dim=-1)
    ids = torch.tensor([10, 11, 10, 13, 14, 15])
    for cls in (ClipLoss, AlignLoss):
        assert cls(multi_positive=True).double()(images, texts, image_ids=ids).item() == pytest.approx(
            cls().double()(images, texts).item(), abs=1e-12)
    assert SigLipLoss(multi_positive=True).double()(images, texts, image_ids=ids).item() != pytest.approx(
        SigLipLoss().double()(images, texts).item(), abs=1e-3)


@pytest.mark.parametrize("ids, message", [(None, "got none"), (torch.tensor([1, 2]), "got shape (2,)")])
def test_missing_image_ids_say_so(ids, message):
    images, texts, _ = _tensors()
    with pytest.raises(ValueError, match=r"clip loss: multi_positive needs the image id of each of the 3 pairs"):
        ClipLoss(multi_positive=True).double()(images, texts, image_ids=ids)
    with pytest.raises(ValueError, match=re.escape(message)):
        ClipLoss(multi_positive=True).double()(images, texts, image_ids=ids)


# --------------------------------------------------------------------------------------------------
# The module: the batch's image ids reach the loss, also through the chunked step


def _batch_with_repeats() -> dict[str, torch.Tensor]:
    batch = _batch("float64")
    batch["image_ids"] = torch.tensor([0, 1, 2, 0, 3, 1, 4, 0])  # image 0 three times, image 1 twice
    return batch


@pytest.mark.parametrize("loss", ["clip", "align", "siglip"])
def test_module_gives_the_loss_the_batch_image_ids(loss):
    batch = _batch_with_repeats()
    on = build([f"model.loss.name={loss}", "model.loss.multi_positive=true"], 1)
    off = build([f"model.loss.name={loss}"], 1)
    encoded = on.encode_pairs(batch)
    expected = on.loss(encoded["image_features"], encoded["text_features"], image_ids=batch["image_ids"])
    assert on.losses(batch)["loss"].item() == pytest.approx(expected.item(), abs=1e-12)
    assert on.losses(batch)["loss"].item() != pytest.approx(off.losses(batch)["loss"].item(), abs=1e-4)


@pytest.mark.parametrize("loss", ["clip", "align", "siglip"])
def test_chunked_step_equals_unchunked_step_with_repeated_images(loss):
    batch = _batch_with_repeats()
    overrides = [f"model.loss.name={loss}", "model.loss.multi_positive=true"]
    assert_same_step(step(build(overrides, 1), batch), step(build(overrides, 3), batch))


def test_yaml_cli_and_python_set_multi_positive(tmp_path, capsys):
    (tmp_path / "multi.yaml").write_text("model:\n  loss: {name: siglip, multi_positive: true}\n")
    assert vlm_lab.build_module(vlm_lab.load_config(TINY, tmp_path / "multi.yaml")).loss.multi_positive
    cfg = vlm_lab.load_config(TINY)
    assert not vlm_lab.build_module(cfg).loss.multi_positive
    cfg.model.loss = {"name": "clip", "multi_positive": True}
    assert vlm_lab.build_module(cfg).loss.multi_positive
    # A whole fit, validation included (its val/loss is computed by the same loss, given the ids).
    assert main(["fit", str(TINY), "model.loss.multi_positive=true", "--run-dir", str(tmp_path / "run")]) == 0
    assert "val/loss" in (tmp_path / "run" / "metrics.json").read_text()
    assert main(["fit", str(TINY), "model.loss.multi_positiv=true", "--run-dir", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "multi_positive" in err and err.count("\n") == 1
