"""vlm-lab's CLIP loss equals open_clip's: same features and scale, then same weights and batch.

The benchmarks (benchmarks/vs_open_clip_*.py) compare vlm-lab with open_clip on speed; this holds the
premise that both compute the same loss, to 1e-5, at three levels: bare features, a small CLIP built
both ways with the same weights, and the LiT headline model on a real Flickr8k batch. The model pairs
come from benchmarks/vs_open_clip_pairs.py, the code the benchmarks time.
"""

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vlm_lab.losses import ClipLoss

open_clip = pytest.importorskip("open_clip")  # a dev dependency (the bench extra): CI installs it

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
FLICKR = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k"
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def pairs():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import vs_open_clip_pairs
    finally:
        sys.path.remove(str(BENCHMARKS))
    return vs_open_clip_pairs


def features(batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(batch, 32, generator=generator), dim=-1)
    text = F.normalize(image + 0.5 * torch.randn(batch, 32, generator=generator), dim=-1)
    return image.requires_grad_(), text.requires_grad_()


@pytest.mark.parametrize("local_loss", [True, False])
@pytest.mark.parametrize("batch,scale", [(1, 1.0), (7, 1 / 0.07), (64, 50.0), (33, 100.0)])
def test_clip_loss_and_gradients_equal_open_clip(batch, scale, local_loss):
    image, text = features(batch, seed=batch)
    ours = ClipLoss(init_logit_scale=math.log(scale), local_loss=local_loss)(image, text)
    our_grads = torch.autograd.grad(ours, (image, text))
    theirs = open_clip.ClipLoss(local_loss=local_loss)(image, text, torch.tensor(scale))
    their_grads = torch.autograd.grad(theirs, (image, text))
    assert abs(ours.item() - theirs.item()) <= TOLERANCE
    assert all(torch.allclose(a, b, rtol=0, atol=TOLERANCE) for a, b in zip(our_grads, their_grads))
    # Not trivially equal: the loss moves with the features (a batch of one has no negatives).
    if batch > 1:
        assert abs(ClipLoss(init_logit_scale=math.log(scale))(image, text.roll(1, 0)).item() - ours.item()) > 0.1


@pytest.mark.slow
def test_small_clip_same_weights_same_batch_same_loss(pairs):
    vision = {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "heads": 2}
    text = {"vocab_size": 49408, "context_length": 16, "width": 64, "layers": 2, "heads": 2}
    module, reference = pairs.small_clip_pair(vision, text, embed_dim=32)
    batch = pairs.small_clip_batch(module, 16)
    ours, theirs = pairs.vlm_lab_loss(module.train(), batch), pairs.open_clip_loss(reference.train(), batch)
    assert abs(ours.item() - theirs.item()) <= TOLERANCE
    ours.backward()
    theirs.backward()
    # open_clip keeps the text projection as an [in, out] matrix applied as x @ proj.
    assert torch.allclose(module.text_head.proj.weight.grad, reference.text_projection.grad.T, rtol=0, atol=TOLERANCE)
    assert torch.allclose(module.vision.embeddings.patch_embedding.weight.grad, reference.visual.conv1.weight.grad,
                          rtol=0, atol=TOLERANCE)
    # Another batch gives another loss: the comparison is not between two constants.
    assert abs(pairs.vlm_lab_loss(module, pairs.small_clip_batch(module, 16, seed=1)).item() - ours.item()) > 1e-3


@pytest.mark.skipif(not FLICKR.is_dir(), reason=f"Flickr8k is not at {FLICKR} (a user's clone has no shared data)")
@pytest.mark.slow
def test_lit_model_same_loss_as_open_clip_custom_text_clip(pairs):
    """EfficientNet-Lite0 (timm) + MiniLM-L6 (HF) built both ways, on 8 real Flickr8k pairs."""
    import vlm_lab

    module, reference = pairs.lit_pair()
    cfg = vlm_lab.load_config(pairs.ROOT / "experiments" / "lit" / "flickr8k_lit.yaml",
                              overrides=["data.num_workers=0", "data.batch_size=8", "embedding_cache.enabled=false",
                                         f"data.train_ann={FLICKR / 'annotations' / 'captions_train.json'}",
                                         f"data.train_images={FLICKR / 'images'}",
                                         f"data.val_ann={FLICKR / 'annotations' / 'captions_val.json'}",
                                         f"data.val_images={FLICKR / 'images'}"])
    datamodule = vlm_lab.build_datamodule(cfg, module)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    assert (batch["attention_mask"] == 0).any()  # padded captions: the two derive their masks differently
    with torch.no_grad():  # eval mode: MiniLM's dropout would draw differently on the two sides
        ours, theirs = pairs.vlm_lab_loss(module.eval(), batch), pairs.open_clip_loss(reference.eval(), batch)
    assert abs(float(ours) - float(theirs)) <= TOLERANCE
    assert 0.5 < float(ours) < 2 * math.log(8) + 1
