"""The evaluation suite: retrieval, captioning, linear probe and few-shot evaluators, and 2 processes = 1 process.

The distributed test starts this file twice as a gloo worker (``python test_eval_suite.py worker ...``,
as tests/test_distributed.py does): each rank runs every evaluator on its share of the data, and
every figure must equal the one process's.
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))

import vlm_lab  # noqa: E402
from datasets_on_disk import good_samples, jpeg_bytes, write_shard  # noqa: E402
from test_distributed import init_gloo, run_workers  # noqa: E402
from test_zeroshot import COLOURS, ColourModel  # noqa: E402
from vlm_lab.errors import ConfigError  # noqa: E402
from vlm_lab.eval.probes import (FewShotEvaluator, LinearProbeEvaluator, fewshot_indices,  # noqa: E402
                                 least_squares_accuracy, weight_decay_grid)
from vlm_lab.eval.split_evaluation import SplitEvaluation  # noqa: E402
from vlm_lab.eval.suite import build_evaluators, run_evaluators  # noqa: E402
from vlm_lab.schema import EvalSettings  # noqa: E402

TINY = TESTS / "configs" / "tiny.yaml"


def noisy_colour_folder(root: Path, per_class: int, seed: int) -> Path:
    """Images of each colour class, shifted by random other colours: classes overlap, so accuracy is not 100%."""
    rng = random.Random(seed)
    for name, rgb in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            colour = tuple(max(0, min(255, c // 2 + rng.randint(0, 160))) for c in rgb)
            Image.new("RGB", (8, 8), colour).save(root / name / f"{i}.png")
    return root


def tiny_module(*overrides: str):
    L.seed_everything(0, verbose=False)
    return vlm_lab.build_module(vlm_lab.load_config(TINY, overrides=list(overrides)))


def suite_specs(data: Path) -> dict:
    """The evaluators both the one-process and the two-process runs evaluate: each kind once."""
    return {
        "colours": {"name": "zeroshot", "root": str(data / "train"), "templates": ["{}", "a {} one"], "batch_size": 4},
        "probe": {"name": "linear_probe", "root": str(data / "train"), "test_root": str(data / "test"),
                  "epochs": 3, "batch_size": 8},
        "fewshot": {"name": "fewshot", "root": str(data / "train"), "test_root": str(data / "test"),
                    "shots": [1, 3], "seeds": 2, "batch_size": 4},
    }


CAPTIONS = {"captions": {"name": "captioning", "data": {"name": "synthetic_shapes", "val_size": 7}, "batch_size": 2}}
COCA = ("model.caption_weight=1.0", "model.caption_head.layers=1", "model.caption_head.heads=2",
        "model.caption_head.image_queries=4", "model.generation.max_new_tokens=6")
RETRIEVAL = {"shapes": {"name": "retrieval", "data": {"name": "synthetic_shapes", "val_size": 13}, "batch_size": 4}}


def write_data(root: Path) -> Path:
    noisy_colour_folder(root / "train", 7, seed=1)
    noisy_colour_folder(root / "test", 5, seed=2)
    (root / "shards").mkdir()
    for shard, size in enumerate(SHARD_SIZES):  # 3 shards over 2 ranks: uneven shares, one read twice in part
        samples = good_samples(shard, size)
        for i, sample in enumerate(samples):  # every image its own colour: no exact ties for rounding to break
            sample["jpg"] = jpeg_bytes((20 * i, 60 * shard, 200 - 10 * i))
        write_shard(root / "shards" / f"{shard:05d}.tar", samples)
    return root


SHARD_SIZES = (5, 7, 4)


def stream_retrieval(data: Path) -> dict:
    """The retrieval evaluator on a ``cc3m`` val split of webdataset shards (a stream)."""
    shards = str(data / "shards" / "{00000..00002}.tar")
    return {"stream": {"name": "retrieval", "data": {"name": "cc3m", "train_shards": shards, "val_shards": shards,
                                                     "eval_batch_size": 3}}}


def evaluate_all(data: Path) -> dict[str, float]:
    colour_metrics = run_evaluators(ColourModel(), build_evaluators(EvalSettings.from_config({"evaluators": suite_specs(data)})))
    retrieval = run_evaluators(tiny_module(), build_evaluators(EvalSettings.from_config(
        {"evaluators": {**RETRIEVAL, **stream_retrieval(data)}})))
    captions = run_evaluators(tiny_module(*COCA), build_evaluators(EvalSettings.from_config({"evaluators": CAPTIONS})))
    return {**colour_metrics, **retrieval, **captions, **split_evaluation()}


def split_evaluation() -> dict[str, float]:
    """What the split evaluation logs for a CoCa model's val batches, dealt out as a distributed Trainer
    deals them (DistributedSampler, not shuffled: 9 images over 2 ranks pad one in), captioning the first 5."""
    cfg = vlm_lab.load_config(TINY, overrides=[*COCA, "model.generation.max_images=5", "data.val_size=9"])
    L.seed_everything(0, verbose=False)
    module = vlm_lab.build_module(cfg).eval()
    val = vlm_lab.build_datamodule(cfg, module).val_dataloader()
    sampler = DistributedSampler(val.dataset, shuffle=False) if torch.distributed.is_initialized() else None
    loader = DataLoader(val.dataset, batch_size=2, sampler=sampler, collate_fn=val.collate_fn)
    logged: dict[str, float] = {}
    module.log = lambda name, value, **options: logged.__setitem__(name, float(value))
    callback, trainer = SplitEvaluation(), SimpleNamespace(sanity_checking=False)
    callback.on_validation_epoch_start(trainer, module)
    scored = callback.captions.compute  # an untrained model's CIDEr is 0 whatever it captions: count them

    def counted(device):
        metrics, rows = scored(device)
        logged["captioned images"] = float(len(rows))
        return metrics, rows

    callback.captions.compute = counted
    with torch.no_grad():
        for index, batch in enumerate(loader):
            callback.on_validation_batch_end(trainer, module, None, batch, index)
    callback.on_validation_epoch_end(trainer, module)
    assert {"val/i2t_R@1", "val/t2i_R@10", "val/chance_i2t_R@1", "val/bleu4", "val/cider"} <= set(logged)
    assert logged["captioned images"] == 5
    return logged


# --------------------------------------------------------------------------------------------------
# Few-shot: big_vision's closed form


def test_least_squares_by_hand():
    # One feature: whitened, 0 -> -1 and 1 -> +1; the bias column (100) is the same for both classes,
    # so the class score follows the sign of the whitened feature: class 1 above 0.5.
    train_x, train_y = torch.tensor([[0.0], [1.0]]), torch.tensor([0, 1])
    test_x, test_y = torch.tensor([[0.2], [0.9], [0.6]]), torch.tensor([0, 1, 0])
    assert least_squares_accuracy(train_x, train_y, test_x, test_y, 2, l2_reg=1.0) == pytest.approx(200 / 3)


def test_both_closed_forms_equal_the_ridge_solution():
    # Fewer points than dimensions (x x^T route) and more (x^T x route) against a direct solve.
    generator = torch.Generator().manual_seed(0)
    for points, dim in ((6, 10), (40, 3)):
        x = torch.randn(points, dim, generator=generator, dtype=torch.float64)
        y = torch.arange(points) % 3
        test = torch.randn(50, dim, generator=generator, dtype=torch.float64)
        mean, std = x.mean(0, keepdim=True), x.std(0, unbiased=False, keepdim=True) + 1e-5
        padded = torch.nn.functional.pad((x - mean) / std, (0, 1), value=100.0)
        targets = 2.0 * torch.nn.functional.one_hot(y, 3).double() - 1.0
        weights = torch.linalg.solve(padded.T @ padded + 4.0 * torch.eye(dim + 1, dtype=torch.float64),
                                     padded.T @ targets)
        predicted = (torch.nn.functional.pad((test - mean) / std, (0, 1), value=100.0) @ weights).argmax(1)
        # Every test point labelled with what the direct solve predicts: the closed form must agree on all.
        assert least_squares_accuracy(x, y, test, predicted, 3, l2_reg=4.0) == 100.0


def test_fewshot_draws_follow_big_vision():
    labels = np.array([0, 1, 0, 1, 0, 2, 2])
    chosen = fewshot_indices(labels, 3, shots=2, seed=0)
    assert sorted(labels[chosen].tolist()) == [0, 0, 1, 1, 2, 2]
    rng = np.random.default_rng(0)  # big_vision: one permutation per class, in class order
    expected = np.concatenate([rng.permutation(np.where(labels == c)[0])[:2] for c in range(3)])
    assert chosen.tolist() == expected.tolist()


def test_fewshot_evaluator_reports_mean_and_spread(tmp_path):
    data = write_data(tmp_path)
    metrics = FewShotEvaluator(root=str(data / "train"), test_root=str(data / "test"), shots=[1, 5], seeds=3,
                               batch_size=4).evaluate(ColourModel())
    assert set(metrics) == {"skipped", "1shot", "1shot_std", "5shot", "5shot_std"}
    assert 100 / 3 < metrics["5shot"] <= 100.0 and metrics["1shot_std"] >= 0.0
    with pytest.raises(ConfigError, match=r"fewshot: need shots >= 1"):
        FewShotEvaluator(root=str(data / "train"), test_root=str(data / "test"), shots=[0])


# --------------------------------------------------------------------------------------------------
# Linear probe: CLIP_benchmark's recipe


@pytest.mark.slow  # 19 small fits: seconds when the machine is free, ~10 s on the loaded 2-core one
def test_linear_probe_separates_colours(tmp_path):
    for split, count in (("train", 5), ("test", 2)):
        for name, rgb in COLOURS.items():
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (8, 8), rgb).save(tmp_path / split / name / f"{i}.png")
    evaluator = LinearProbeEvaluator(root=str(tmp_path / "train"), test_root=str(tmp_path / "test"), epochs=8,
                                     batch_size=8)
    state = torch.random.get_rng_state()
    metrics = evaluator.evaluate(ColourModel())
    assert torch.equal(state, torch.random.get_rng_state())  # the probe's draws leave the global RNG alone
    assert metrics["top1"] == 100.0 and metrics["mean_per_class_recall"] == 100.0
    assert metrics["weight_decay"] in weight_decay_grid()


def test_probe_folders_must_match(tmp_path):
    data = write_data(tmp_path)
    (data / "test" / "purple").mkdir()
    Image.new("RGB", (8, 8)).save(data / "test" / "purple" / "0.png")
    with pytest.raises(ConfigError, match=r"linear_probe: the classes of the train \(3\) and test \(4\) images differ"):
        LinearProbeEvaluator(root=str(data / "train"), test_root=str(data / "test"))
    with pytest.raises(ConfigError, match=r"val_proportion=1.5 should be between 0 and 1"):
        LinearProbeEvaluator(root=str(data / "train"), test_root=str(data / "test"), val_proportion=1.5)


# --------------------------------------------------------------------------------------------------
# A datasets dataset instead of image folders


def colour_table(root: Path) -> Path:
    """A saved ``datasets`` DatasetDict (train, test) of colour images with ClassLabel labels."""
    import datasets

    names = list(COLOURS)
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    splits = {}
    for split, count in (("train", 4), ("test", 2)):
        rows = [(Image.new("RGB", (8, 8), COLOURS[name]), label) for label, name in enumerate(names) for _ in range(count)]
        splits[split] = datasets.Dataset.from_dict({"img": [r[0] for r in rows], "label": [r[1] for r in rows]},
                                                   features=features)
    datasets.DatasetDict(splits).save_to_disk(str(root))
    return root


def test_evaluators_read_a_datasets_dataset(tmp_path):
    table = str(colour_table(tmp_path / "colours"))
    zeroshot = vlm_lab.build("evaluator", {"name": "zeroshot", "dataset": table, "image_column": "img",
                                           "templates": "simple", "max_per_class": 1})
    assert zeroshot.folder.classnames == list(COLOURS)
    metrics = run_evaluators(ColourModel(), {"z": zeroshot, "f": vlm_lab.build("evaluator", {
        "name": "fewshot", "dataset": table, "image_column": "img", "shots": [1, 2], "seeds": 2})})
    assert metrics["eval/z/top1"] == 100.0 and metrics["eval/z/images"] == 3
    assert metrics["eval/f/2shot"] == 100.0
    with pytest.raises(ConfigError, match=r"zeroshot: give either root .* or dataset"):
        vlm_lab.build("evaluator", {"name": "zeroshot"})
    with pytest.raises(ConfigError, match=r"zeroshot.label_column='class' is not a column"):
        vlm_lab.build("evaluator", {"name": "zeroshot", "dataset": table, "image_column": "img", "label_column": "class"})


# --------------------------------------------------------------------------------------------------
# Retrieval on a data module's split


@pytest.mark.slow
def test_retrieval_evaluator_equals_the_modules_validation(tmp_path):
    cfg = vlm_lab.load_config(TINY, overrides=["data.val_size=13", "data.batch_size=4", "trainer.logger=false",
                                               "trainer.enable_checkpointing=false"])
    module = tiny_module()
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    validated = trainer.validate(module, datamodule=vlm_lab.build_datamodule(cfg, module), verbose=False)[0]
    metrics = run_evaluators(tiny_module(), build_evaluators(EvalSettings.from_config({"evaluators": RETRIEVAL})))
    for key in ("i2t_R@1", "i2t_R@5", "t2i_R@1", "t2i_R@10"):
        assert metrics[f"eval/shapes/{key}"] == pytest.approx(validated[f"val/{key}"], abs=1e-4), key
        assert metrics[f"eval/shapes/chance_{key}"] == pytest.approx(validated[f"val/chance_{key}"], abs=1e-4)
    assert metrics["eval/shapes/images"] == 13


@pytest.mark.slow
def test_captioning_evaluator_equals_the_modules_validation():
    cfg = vlm_lab.load_config(TINY, overrides=[*COCA, "data.val_size=10", "data.batch_size=4"])
    L.seed_everything(0, verbose=False)
    module = vlm_lab.build_module(cfg)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    validated = trainer.validate(module, datamodule=vlm_lab.build_datamodule(cfg, module), verbose=False)[0]
    spec = {"name": "captioning", "data": {"name": "synthetic_shapes", "val_size": 10}, "batch_size": 3}
    metrics = run_evaluators(module, {"shapes": vlm_lab.build("evaluator", spec)})
    assert metrics["eval/shapes/images"] == 10
    assert metrics["eval/shapes/bleu4"] == pytest.approx(validated["val/bleu4"], abs=1e-6)
    assert metrics["eval/shapes/cider"] == pytest.approx(validated["val/cider"], abs=1e-6)
    with pytest.raises(ConfigError, match=r"captioning: the model has no caption head"):
        run_evaluators(tiny_module(), {"shapes": vlm_lab.build("evaluator", spec)})


def test_captioning_the_first_images_of_a_stream_is_refused(tmp_path):
    (tmp_path / "shards").mkdir()
    write_shard(tmp_path / "shards" / "00000.tar", good_samples(0, 3))
    shards = str(tmp_path / "shards" / "00000.tar")
    spec = {"name": "captioning", "max_images": 2, "data": {"name": "cc3m", "train_shards": shards, "val_shards": shards}}
    with pytest.raises(ConfigError, match=r"captioning: max_images picks the first images of a split, and the val "
                                          r"split of data module 'cc3m' is a stream"):
        run_evaluators(tiny_module(*COCA), {"c": vlm_lab.build("evaluator", spec)})


def test_retrieval_spec_is_checked_when_built():
    with pytest.raises(ConfigError, match=r"eval.evaluators.r: .*has no argument 'val_sise'"):
        build_evaluators(EvalSettings.from_config({"evaluators": {
            "r": {"name": "retrieval", "data": {"name": "synthetic_shapes", "val_sise": 3}}}}))
    with pytest.raises(ConfigError, match=r"evaluator name 'a/b' should be letters"):
        EvalSettings.from_config({"evaluators": {"a/b": {"name": "zeroshot", "root": "x"}}})


# --------------------------------------------------------------------------------------------------
# Two processes give the figures of one


@pytest.mark.slow
def test_two_processes_give_the_figures_of_one(tmp_path):
    data = write_data(tmp_path / "data")
    one = evaluate_all(data)
    assert one["eval/colours/images"] == 21 and 0 < one["eval/colours/top1"] < 100  # overlapping classes
    assert one["eval/stream/images"] == one["eval/stream/texts"] == sum(SHARD_SIZES)  # each sample once
    ranks = run_workers(__file__, tmp_path)
    for rank, results in enumerate(ranks):
        assert set(results) == set(one)
        for key, value in one.items():
            assert results[key] == pytest.approx(value, abs=1e-6), (rank, key)


@pytest.mark.slow
def test_vlm_lab_eval_under_a_torchrun_launch(tmp_path):
    """Two processes with torchrun's variables join one gloo group and report one process's figures."""
    import socket
    import subprocess

    data = write_data(tmp_path / "data")
    spec = f"eval.evaluators.colours={{name: zeroshot, root: {data / 'train'}, templates: simple, batch_size: 4}}"
    command = [sys.executable, "-m", "vlm_lab.cli", "eval", str(TINY), spec]
    single = subprocess.run([*command, "--run-dir", str(tmp_path / "one")], capture_output=True, text=True)
    assert single.returncode == 0, single.stderr[-2000:]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    base = {**os.environ, "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port), "PYTHONPATH": str(TESTS.parent)}
    procs = [subprocess.Popen([*command, "--run-dir", str(tmp_path / "two")], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env={**base, "RANK": str(rank), "LOCAL_RANK": str(rank)}) for rank in range(2)]
    outputs = [proc.communicate(timeout=300)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert {k: v for k, v in two.items() if k.startswith("eval/")} == {k: v for k, v in one.items() if k.startswith("eval/")}
    assert "colours/top1" in outputs[0] and "colours/top1" not in outputs[1]  # one table, from rank 0


def _worker(init_file: str, out_file: str, rank: int) -> None:
    import torch.distributed as dist

    init_gloo(init_file, rank)
    data = Path(out_file).parent / "data"
    torch.save(evaluate_all(data), out_file)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(TESTS.parent))
    _worker(sys.argv[2], sys.argv[3], int(sys.argv[4]))
