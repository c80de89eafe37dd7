"""Projection heads, and retrieval recall on examples whose answers are worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from vlm_lab.errors import ConfigError
from vlm_lab.eval.retrieval import chance_levels, retrieval_metrics
from vlm_lab.heads import IdentityHead, LinearHead, MLPHead
from vlm_lab.registry import build

# --------------------------------------------------------------------------------------------------
# Heads


def test_linear_head():
    head = build("head", {"name": "linear", "out_dim": 8}, in_dim=16)
    assert isinstance(head, LinearHead) and head.out_dim == 8
    assert head(torch.randn(3, 16)).shape == (3, 8)
    assert head.proj.bias is None  # no bias unless asked for
    assert build("head", {"name": "linear", "out_dim": 8, "bias": True}, in_dim=16).proj.bias is not None


def test_mlp_head():
    head = build("head", {"name": "mlp", "out_dim": 8, "hidden_dim": 32, "dropout": 0.1}, in_dim=16)
    assert isinstance(head, MLPHead) and head.out_dim == 8
    assert head(torch.randn(3, 16)).shape == (3, 8)
    assert [m.out_features for m in head.net if isinstance(m, torch.nn.Linear)] == [32, 8]
    # The hidden width defaults to the input width.
    assert build("head", {"name": "mlp", "out_dim": 8}, in_dim=16).hidden_dim == 16


def test_identity_head():
    head = build("head", {"name": "identity"}, in_dim=12)
    assert isinstance(head, IdentityHead) and head.out_dim == 12
    x = torch.randn(2, 12)
    assert head(x) is x
    assert build("head", {"name": "identity", "out_dim": 12}, in_dim=12).out_dim == 12


def test_identity_head_width_mismatch_is_a_config_error():
    with pytest.raises(ConfigError, match="identity head cannot change the width") as info:
        build("head", {"name": "identity", "out_dim": 8}, in_dim=12)
    assert "\n" not in str(info.value)


def test_head_in_dim_comes_from_the_framework():
    with pytest.raises(ConfigError, match="set by vlm-lab"):
        build("head", {"name": "linear", "in_dim": 4, "out_dim": 8}, in_dim=16)
    with pytest.raises(ConfigError, match="hidden_dim"):
        build("head", {"name": "mlp", "out_dim": 8, "hidden_dim": 3.5}, in_dim=16)


# --------------------------------------------------------------------------------------------------
# Retrieval: a hand-built example
#
# Images are the axes e0, e1, e2. Captions (caption -> image):
#   t0 -> 0: e1            (a caption of image 0 that looks like image 1)
#   t1 -> 0: e0            (image 0's second caption, which matches)
#   t2 -> 1: (.6, 0, .8)
#   t3 -> 2: (.8, 0, .6)
#   t4 -> 2: (0, .6, .8)
#
# Image to text, texts ordered by similarity (equal ones by index):
#   e0: t1 1, t3 .8, t2 .6, t0 0, t4 0    -> best caption t1 at rank 0
#   e1: t0 1, t4 .6, t1 0, t2 0, t3 0     -> t2 at rank 3
#   e2: t2 .8, t4 .8, t3 .6, t0 0, t1 0   -> t4 at rank 1 (tied with t2, which has the lower index)
# Text to image, rank of the right image:
#   t0: e1 1, e0 0, e2 0 -> rank 1;  t1 -> 0;  t2: e2 .8, e0 .6, e1 0 -> rank 2;
#   t3: e0 .8, e2 .6 -> rank 1;      t4: e2 .8 -> rank 0
# So i2t ranks are [0, 3, 1] and t2i ranks [1, 0, 2, 1, 0].

IMAGES = torch.eye(3)
TEXTS = torch.tensor(
    [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.6, 0.0, 0.8], [0.8, 0.0, 0.6], [0.0, 0.6, 0.8]]
)
TEXT_TO_IMAGE = torch.tensor([0, 0, 1, 2, 2])


def test_hand_built_example():
    metrics = retrieval_metrics(IMAGES, TEXTS, TEXT_TO_IMAGE, ks=(1, 2, 5, 10))
    expected = {
        "i2t_R@1": 100 / 3,
        "i2t_R@2": 200 / 3,
        "i2t_R@5": 100.0,
        "i2t_R@10": 100.0,  # more than the 5 candidates: everything is found
        "t2i_R@1": 40.0,
        "t2i_R@2": 80.0,
        "t2i_R@5": 100.0,
        "t2i_R@10": 100.0,
    }
    assert list(metrics) == list(expected)
    assert metrics == pytest.approx(expected)


def test_default_keys_and_scale_invariance():
    # Features are normalised inside, so scaling them changes nothing.
    metrics = retrieval_metrics(IMAGES * 7.0, TEXTS * 0.1, TEXT_TO_IMAGE)
    assert list(metrics) == ["i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10"]
    assert metrics["i2t_R@1"] == pytest.approx(100 / 3) and metrics["t2i_R@1"] == pytest.approx(40.0)


def test_any_caption_counts_for_image_to_text():
    # Only image 0's *second* caption matches it; that is enough for R@1.
    images = torch.eye(3)
    texts = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # t0 looks like image 2
    metrics = retrieval_metrics(images, texts, torch.tensor([0, 0, 1]), ks=(1,))
    # Image 2 has no caption and can never be found; image 0 finds t1, image 1 finds t2.
    assert metrics["i2t_R@1"] == pytest.approx(200 / 3)
    assert metrics["t2i_R@1"] == pytest.approx(200 / 3)  # t0 retrieves image 2


def test_identical_features_give_perfect_recall():
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(20, 16, generator=gen)
    text_to_image = torch.randint(0, 20, (60,), generator=gen)
    text_to_image[:20] = torch.arange(20)  # every image has at least one caption
    metrics = retrieval_metrics(images, images[text_to_image], text_to_image)
    assert all(v == 100.0 for v in metrics.values())


def test_shifted_captions_give_computed_recall():
    # Caption j describes image j but has image (j + 1) % 4's features, with orthonormal images: its
    # own image scores 0, level with two others, behind the one scoring 1; equal scores go by index.
    # t2i: caption j ranks image j after image j+1 and the lower-indexed zeros:
    #   t0: [e1], e0 -> 1;  t1: [e2, e0], e1 -> 2;  t2: [e3, e0, e1], e2 -> 3;  t3: [e0, e1, e2], e3 -> 3
    # i2t: image i ranks its caption t_i after caption t_(i-1) and the lower-indexed zeros:
    #   e0: [t3], t0 -> 1;  e1: [t0], t1 -> 1;  e2: [t1, t0], t2 -> 2;  e3: [t2, t0, t1], t3 -> 3
    images = torch.eye(4)
    texts = images.roll(-1, dims=0)
    metrics = retrieval_metrics(images, texts, torch.arange(4), ks=(1, 2, 3, 4))
    assert metrics == pytest.approx(
        {
            "i2t_R@1": 0.0, "i2t_R@2": 50.0, "i2t_R@3": 75.0, "i2t_R@4": 100.0,
            "t2i_R@1": 0.0, "t2i_R@2": 25.0, "t2i_R@3": 50.0, "t2i_R@4": 100.0,
        }
    )


def test_chunked_equals_unchunked():
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(50, 8, generator=gen)
    text_to_image = torch.randint(0, 50, (130,), generator=gen)
    texts = images[text_to_image] + 1.5 * torch.randn(130, 8, generator=gen)
    whole = retrieval_metrics(images, texts, text_to_image, ks=(1, 3, 10), chunk_size=10_000)
    chunked = retrieval_metrics(images, texts, text_to_image, ks=(1, 3, 10), chunk_size=7)
    assert chunked == whole
    assert 0 < whole["t2i_R@1"] < 100 and 0 < whole["i2t_R@1"] < 100  # a non-trivial case


def test_retrieval_input_errors():
    with pytest.raises(ValueError, match="image indices"):
        retrieval_metrics(IMAGES, TEXTS, torch.tensor([0, 0, 1, 2, 3]))
    with pytest.raises(ValueError, match="one entry per text"):
        retrieval_metrics(IMAGES, TEXTS, torch.tensor([0, 1, 2]))


# --------------------------------------------------------------------------------------------------
# Chance levels


def test_chance_levels_by_hand():
    # 5 texts; images 0 and 2 have 2 captions, image 1 has 1.
    # i2t K=1: 1 - C(3,1)/C(5,1) = 0.4 for two captions, 1 - 4/5 = 0.2 for one -> (0.4+0.2+0.4)/3.
    # i2t K=2: 1 - C(3,2)/C(5,2) = 0.7, 1 - C(4,2)/C(5,2) = 0.4 -> (0.7+0.4+0.7)/3 = 0.6.
    levels = chance_levels(TEXT_TO_IMAGE, num_images=3, ks=(1, 2, 5, 10))
    expected = {
        "i2t_R@1": 100 / 3,
        "i2t_R@2": 60.0,
        "i2t_R@5": 100.0,
        "i2t_R@10": 100.0,
        "t2i_R@1": 100 / 3,
        "t2i_R@2": 200 / 3,
        "t2i_R@5": 100.0,
        "t2i_R@10": 100.0,
    }
    assert list(levels) == list(expected)
    assert levels == pytest.approx(expected)


def test_chance_levels_small_case_formula():
    text_to_image = torch.tensor([0, 0, 0, 1, 2, 2, 3, 4, 4, 4, 4])  # 3, 1, 2, 1, 4 captions
    levels = chance_levels(text_to_image, num_images=5, ks=(1, 3))
    assert levels["i2t_R@1"] == pytest.approx(100 * (3 + 1 + 2 + 1 + 4) / 11 / 5)
    assert levels["i2t_R@3"] == pytest.approx(
        100 * sum(1 - math.comb(11 - c, 3) / math.comb(11, 3) for c in (3, 1, 2, 1, 4)) / 5
    )
    assert levels["t2i_R@3"] == pytest.approx(60.0)


def test_chance_levels_match_random_features():
    # With i.i.d. Gaussian features every ranking is equally likely, so the mean recall over random
    # draws estimates the chance level. 10 images with 1 to 4 captions each (25 texts): small enough
    # that the exact i2t level is far from the naive c*K/T (i2t_R@10: 69% against 79%).
    num_images, trials, ks = 10, 150, (1, 5, 10)
    text_to_image = torch.arange(num_images).repeat_interleave(torch.arange(num_images) % 4 + 1)
    gen = torch.Generator().manual_seed(2)
    totals = dict.fromkeys(chance_levels(text_to_image, num_images, ks), 0.0)
    for _ in range(trials):
        images = torch.randn(num_images, 8, generator=gen)
        texts = torch.randn(len(text_to_image), 8, generator=gen)
        for key, value in retrieval_metrics(images, texts, text_to_image, ks).items():
            totals[key] += value / trials
    levels = chance_levels(text_to_image, num_images, ks)
    assert levels["t2i_R@5"] == pytest.approx(50.0) and levels["t2i_R@10"] == pytest.approx(100.0)
    for key, level in levels.items():
        samples = trials * (num_images if key.startswith("i2t") else len(text_to_image))
        tolerance = 4 * 100 * math.sqrt(level / 100 * (1 - level / 100) / samples) + 0.2
        assert totals[key] == pytest.approx(level, abs=tolerance), (key, totals[key], level)
