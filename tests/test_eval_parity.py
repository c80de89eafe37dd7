"""vlm-lab's evaluators against CLIP_benchmark (clip-benchmark 1.6.2, a dev dependency) on real data.

The same model (the tiny test CLIP, fixed seed), the same images and preprocessing, CLIP_benchmark's
own functions called through a thin wrapper (``BenchmarkModel``: its ``tokenizer(texts)`` hands the
strings on and ``encode_text`` encodes them with the module's tokenizer), with ``amp=False``:

* zero-shot CIFAR-10 (the shared test images, 50 per class): ``zero_shot_classifier`` and
  ``run_classification`` against the ``zeroshot`` evaluator's top-1 and mean per-class recall;
* linear probe on CIFAR-10 features (train: 30 images per class, test: the next 20): its
  ``find_peak`` weight-decay search, ``train`` and ``infer`` against the ``linear_probe`` evaluator;
* retrieval on Flickr8k val (1,000 images x 5 captions): ``zeroshot_retrieval.evaluate`` against
  the ``retrieval`` evaluator's R@1/5/10 both ways.

Every figure must agree within 0.1 points. Two workarounds for CLIP_benchmark 1.6.2 itself: its
``accuracy`` calls ``float()`` on a one-element array, which numpy 2.x refuses, so the test patches
in the same computation with ``.item()``; its linear probe assumes CUDA (``.cuda()``,
``DataParallel``), which the test makes no-ops on the CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from datasets_on_disk import FLICKR8K, SHARED, needs_shared

import vlm_lab
from vlm_lab.eval.image_folder import LabelledImages, image_features, read_image_folder
from vlm_lab.eval.suite import run_evaluators
from vlm_lab.eval.templates import TEMPLATE_SETS
from vlm_lab.data.transforms import build_transform, decode_size

clip_benchmark = pytest.importorskip("clip_benchmark")
from clip_benchmark.metrics import linear_probe as cb_linear_probe  # noqa: E402
from clip_benchmark.metrics import zeroshot_classification as cb_zeroshot  # noqa: E402
from clip_benchmark.metrics import zeroshot_retrieval as cb_retrieval  # noqa: E402

TINY = Path(__file__).parent / "configs" / "tiny.yaml"
CIFAR = SHARED / "cifar10-test"
TEMPLATES = json.loads((Path(clip_benchmark.__file__).parent / "datasets"
                        / "en_zeroshot_classification_templates.json").read_text())

pytestmark = [needs_shared, pytest.mark.slow]


def fixed_accuracy(output, target, topk=(1,)):
    """CLIP_benchmark's ``accuracy``, with ``.item()`` where it calls ``float()`` on an array."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]


class _Texts:
    def __init__(self, texts):
        self.texts = texts

    def to(self, device):
        return self


class BenchmarkModel(torch.nn.Module):
    """The thin wrapper: CLIP_benchmark's model and tokenizer interface over a vlm-lab module."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def encode_image(self, pixels):
        return self.module.encode_image(pixels)

    def encode_text(self, texts: _Texts):
        return self.module.encode_text(texts.texts)


@pytest.fixture(scope="module")
def module():
    L.seed_everything(0, verbose=False)
    return vlm_lab.build_module(vlm_lab.load_config(TINY)).eval()


def folder_loader(module, samples, batch_size=100):
    config = module.image_config
    dataset = LabelledImages(samples, build_transform(config, augment=False), decode_size(config), (3, *config.size))
    return DataLoader(dataset, batch_size=batch_size)


def test_zeroshot_cifar10_equals_clip_benchmark(module, monkeypatch):
    monkeypatch.setattr(cb_zeroshot, "accuracy", fixed_accuracy)
    templates = [t.replace("{c}", "{}") for t in TEMPLATES["cifar10"]]
    ours = run_evaluators(module, {"c10": vlm_lab.build("evaluator", {
        "name": "zeroshot", "root": str(CIFAR), "classnames": "cifar10", "templates": "cifar10",
        "max_per_class": 50, "batch_size": 64})})

    folder = read_image_folder(CIFAR, "cifar10", max_per_class=50)
    wrapped = BenchmarkModel(module)
    with torch.no_grad():
        classifier = cb_zeroshot.zero_shot_classifier(wrapped, _Texts, folder.classnames, TEMPLATES["cifar10"],
                                                      "cpu", amp=False)
        logits, target = cb_zeroshot.run_classification(wrapped, classifier, folder_loader(module, folder.samples),
                                                         "cpu", amp=False)
    top1, top5 = cb_zeroshot.accuracy(logits, target, topk=(1, 5))
    from sklearn.metrics import balanced_accuracy_score

    recall = balanced_accuracy_score(target, logits.argmax(axis=1))
    assert templates == list(TEMPLATE_SETS["cifar10"])  # the same prompts on both sides
    print(f"zero-shot CIFAR-10 top-1 {ours['eval/c10/top1']:.2f} vs CLIP_benchmark {100 * top1:.2f}, top-5 "
          f"{ours['eval/c10/top5']:.2f} vs {100 * top5:.2f}, mean per-class recall "
          f"{ours['eval/c10/mean_per_class_recall']:.2f} vs {100 * recall:.2f}")
    assert ours["eval/c10/top1"] == pytest.approx(100 * top1, abs=0.1)
    assert ours["eval/c10/top5"] == pytest.approx(100 * top5, abs=0.1)
    assert ours["eval/c10/mean_per_class_recall"] == pytest.approx(100 * recall, abs=0.1)


def test_linear_probe_equals_clip_benchmark(module, monkeypatch, tmp_path):
    # The train folder: the first 30 CIFAR-10 test images of each class; the test folder: the next 20.
    for split, (start, stop) in (("train", (0, 30)), ("test", (30, 50))):
        for class_dir in sorted(CIFAR.iterdir()):
            (tmp_path / split / class_dir.name).mkdir(parents=True)
            for image in sorted(class_dir.iterdir())[start:stop]:
                (tmp_path / split / class_dir.name / image.name).symlink_to(image)
    settings = {"lr": 0.1, "epochs": 4, "batch_size": 64, "seed": 0}
    evaluator = vlm_lab.build("evaluator", {"name": "linear_probe", "root": str(tmp_path / "train"),
                                            "test_root": str(tmp_path / "test"), "val_proportion": 0.2, **settings})
    ours = run_evaluators(module, {"probe": evaluator})

    # CLIP_benchmark's search and training on the same features and the same held-out split.
    monkeypatch.setattr(cb_linear_probe, "accuracy", fixed_accuracy)
    monkeypatch.setattr(torch.nn.Module, "cuda", lambda self, *a, **k: self)
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    monkeypatch.setattr(torch.nn, "DataParallel", lambda model, device_ids=None: model)
    with torch.no_grad():
        train_x, train_y = image_features(module, evaluator.train, 64, 0)
        test_x, test_y = image_features(module, evaluator.test, 64, 0)
    order = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(0))
    val, fit = order[:60], order[60:]  # the evaluator holds out round(300 * 0.2) images, the first of this permutation

    def loader(x, y):
        return DataLoader(cb_linear_probe.FeatureDataset(x, y), batch_size=64, shuffle=True)

    wd_list = np.logspace(-6, 2, num=97).tolist()
    initial = [i for i, value in enumerate(wd_list) if value in np.logspace(-6, 2, num=7).tolist()]
    arguments = (train_x.shape[1], 10, 0.1, 4, False, "cpu", False, 0)  # input, classes, lr, epochs, amp, device, verbose, seed
    peak = cb_linear_probe.find_peak(wd_list, initial, loader(train_x[fit], train_y[fit]),
                                     loader(train_x[val], train_y[val]), *arguments)
    step = 8
    while step > 0:
        left, right = max(peak - step, 0), min(peak + step, len(wd_list) - 1)
        peak = cb_linear_probe.find_peak(wd_list, [left, peak, right], loader(train_x[fit], train_y[fit]),
                                         loader(train_x[val], train_y[val]), *arguments)
        step //= 2
    everything = loader(np.concatenate((train_x[fit], train_x[val])), np.concatenate((train_y[fit], train_y[val])))
    model = cb_linear_probe.train(everything, train_x.shape[1], 10, wd_list[peak], 0.1, 4, False, "cpu", 0)
    logits, target = cb_linear_probe.infer(model, loader(test_x, test_y), False, "cpu")
    top1, = fixed_accuracy(logits.float(), target.float())

    print(f"linear probe top-1 {ours['eval/probe/top1']:.2f} vs CLIP_benchmark {100 * top1:.2f}, weight decay "
          f"{ours['eval/probe/weight_decay']:.3g} vs {wd_list[peak]:.3g}")
    assert ours["eval/probe/weight_decay"] == pytest.approx(wd_list[peak])
    assert ours["eval/probe/top1"] == pytest.approx(100 * top1, abs=0.1)


def test_retrieval_flickr8k_equals_clip_benchmark(module):
    data = {"name": "coco_captions", "val_ann": str(FLICKR8K / "annotations" / "captions_val.json"),
            "val_images": str(FLICKR8K / "images"), "eval_batch_size": 100}
    ours = run_evaluators(module, {"flickr": vlm_lab.build("evaluator", {"name": "retrieval", "data": data,
                                                                          "batch_size": 100})})

    datamodule = vlm_lab.build("datamodule", data, tokenizer=module.tokenizer, image_config=module.image_config,
                               max_length=module.max_length)
    dataset = datamodule.dataset("val")
    items = sorted(range(len(dataset)), key=lambda i: dataset.records[i].image_id)  # our order: by image id
    loader = DataLoader(torch.utils.data.Subset(dataset, items), batch_size=100,
                        collate_fn=lambda samples: (torch.stack([s["pixel_values"] for s in samples]),
                                                    [s["captions"] for s in samples]))
    with torch.no_grad():
        theirs = cb_retrieval.evaluate(BenchmarkModel(module), loader, _Texts, "cpu", amp=False,
                                       recall_k_list=[1, 5, 10])
    assert ours["eval/flickr/images"] == 1000 and ours["eval/flickr/texts"] == 5000
    print("retrieval (vlm-lab, CLIP_benchmark):", {
        ours_key: (round(ours[f"eval/flickr/{ours_key}"], 2), round(100 * theirs[key], 2)) for k in (1, 5, 10)
        for ours_key, key in ((f"t2i_R@{k}", f"image_retrieval_recall@{k}"), (f"i2t_R@{k}", f"text_retrieval_recall@{k}"))})
    for k in (1, 5, 10):
        assert ours[f"eval/flickr/t2i_R@{k}"] == pytest.approx(100 * theirs[f"image_retrieval_recall@{k}"], abs=0.1)
        assert ours[f"eval/flickr/i2t_R@{k}"] == pytest.approx(100 * theirs[f"text_retrieval_recall@{k}"], abs=0.1)
