"""Loss equality, vlm-lab against open_clip: the same weights and the same batch give the same CLIP loss.

    python benchmarks/vs_open_clip_loss.py            # about a minute on 2 CPU cores
    python benchmarks/vs_open_clip_loss.py --no-lit   # without the Flickr8k LiT model (no shared data needed)

Three levels, each reporting the largest absolute difference of the loss (and of its gradients)
between ``vlm_lab.losses.ClipLoss`` and ``open_clip.ClipLoss`` (single process; ``local_loss`` on and
off on both sides, which coincide on one process):

1. **features**: the same L2-normalised features and logit scale, batches of 1 to 256, scales 1 to 100;
2. **small CLIP**: the native towers and open_clip's ``CLIP`` with the same weights
   (``vs_open_clip_pairs.small_clip_pair``), one batch of 64 random images and token rows, loss and
   gradients of every parameter;
3. **LiT**: the headline LiT model (EfficientNet-Lite0 + MiniLM-L6) and open_clip's ``CustomTextCLIP``
   with the same weights, on the first Flickr8k training batch (128 pairs, eval mode: MiniLM's
   dropout draws differ between the two otherwise).

The target is a difference of at most 1e-5 everywhere. Exits with status 1 if it is missed.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import open_clip  # noqa: E402
import torch  # noqa: E402

import vlm_lab  # noqa: E402
from vlm_lab.losses import ClipLoss  # noqa: E402
from vs_open_clip_pairs import (FLICKR, ROOT, lit_pair, machine, normalised_features, open_clip_loss,  # noqa: E402
                                small_clip_batch, small_clip_pair, vlm_lab_loss)

TOLERANCE = 1e-5


def features_level(batch: int, scale: float, local_loss: bool) -> tuple[float, float, float]:
    """Both losses and the max |gradient difference| for the same features and logit scale."""
    image, text = normalised_features(batch, 256, seed=batch)
    results = []
    for loss_fn in (ClipLoss(init_logit_scale=float(torch.tensor(scale).log()), local_loss=local_loss),
                    lambda i, t: open_clip.ClipLoss(local_loss=local_loss)(i, t, torch.tensor(scale))):
        i, t = image.clone().requires_grad_(), text.clone().requires_grad_()
        loss = loss_fn(i, t)
        loss.backward()
        results.append((loss.detach(), torch.cat([i.grad, t.grad])))
    (ours, our_grad), (theirs, their_grad) = results
    return float(ours), float(theirs), float((our_grad - their_grad).abs().max())


def model_level(module, reference, batch: dict[str, torch.Tensor]) -> tuple[float, float, float]:
    """Both losses, and the max |gradient difference| over the projections (the parameters named the same
    way on both sides) for one batch."""
    ours, theirs = vlm_lab_loss(module, batch), open_clip_loss(reference, batch)
    ours.backward()
    theirs.backward()
    our_grads = [module.vision_head.proj.weight.grad, module.text_head.proj.weight.grad]
    proj = reference.visual.proj if isinstance(reference, open_clip.CLIP) else reference.visual.head.proj.weight
    text_proj = reference.text_projection if isinstance(reference, open_clip.CLIP) else reference.text.proj.weight
    their_grads = [proj.grad, text_proj.grad]
    if isinstance(reference, open_clip.CLIP):  # open_clip keeps these as [in, out] matrices applied as x @ proj
        their_grads = [g.T for g in their_grads]
    grad_diff = max(float((a - b).abs().max()) for a, b in zip(our_grads, their_grads))
    return float(ours.detach()), float(theirs.detach()), grad_diff


def first_flickr_batch(module) -> dict[str, torch.Tensor]:
    cfg = vlm_lab.load_config(ROOT / "experiments" / "lit" / "flickr8k_lit.yaml",
                              overrides=["data.num_workers=0", "embedding_cache.enabled=false"])
    datamodule = vlm_lab.build_datamodule(cfg, module)
    datamodule.setup("fit")
    return next(iter(datamodule.train_dataloader()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-lit", action="store_true", help="skip the Flickr8k LiT model")
    args = parser.parse_args()
    worst = 0.0
    print(f"\n{machine()}\n")
    print("| level | case | vlm-lab loss | open_clip loss | loss difference | gradient difference |\n|---|---|---|---|---|---|")
    for batch, scale, local_loss in itertools.product((1, 8, 64, 256), (1.0, 1 / 0.07, 100.0), (True, False)):
        ours, theirs, grad_diff = features_level(batch, scale, local_loss)
        worst = max(worst, abs(ours - theirs), grad_diff)
        if batch == 64 and local_loss:  # the table shows a few; the worst case counts them all
            print(f"| features | batch {batch}, scale {scale:.1f} | {ours:.7f} | {theirs:.7f} | "
                  f"{abs(ours - theirs):.1e} | {grad_diff:.1e} |")

    torch.manual_seed(0)
    module, reference = small_clip_pair()
    ours, theirs, grad_diff = model_level(module.train(), reference.train(), small_clip_batch(module, 64))
    worst = max(worst, abs(ours - theirs), grad_diff)
    print(f"| small CLIP | batch 64, same weights | {ours:.7f} | {theirs:.7f} | {abs(ours - theirs):.1e} | "
          f"{grad_diff:.1e} |")

    if not args.no_lit and FLICKR.is_dir():
        module, reference = lit_pair()
        batch = first_flickr_batch(module)
        ours, theirs, grad_diff = model_level(module.eval(), reference.eval(), batch)
        worst = max(worst, abs(ours - theirs), grad_diff)
        print(f"| LiT (EfficientNet-Lite0 + MiniLM-L6) | first Flickr8k batch of {len(batch['image_ids'])} | "
              f"{ours:.7f} | {theirs:.7f} | {abs(ours - theirs):.1e} | {grad_diff:.1e} |")
    print(f"\nlargest difference over all cases: {worst:.1e} (target <= {TOLERANCE:.0e})")
    sys.exit(0 if worst <= TOLERANCE else 1)


if __name__ == "__main__":
    main()
