"""Zero-shot classification: the prompt ensemble, top-1/top-5, the fit callback and `vlm-lab zeroshot`."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vlm_lab.cli import main
from vlm_lab.errors import ConfigError
from vlm_lab.eval.templates import TEMPLATE_SETS
from vlm_lab.eval.zeroshot import ZeroShotSettings, class_embeddings, read_image_folder, zero_shot_accuracy
from vlm_lab.towers.base import ImageConfig

CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-test"
TINY = Path(__file__).parent / "configs" / "tiny.yaml"
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


class ColourModel(torch.nn.Module):
    """A stand-in CLIP that knows colours: images embed as their mean RGB, texts as the colour they name."""

    image_config = ImageConfig(size=(8, 8), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    device = torch.device("cpu")

    def __init__(self):
        super().__init__()
        self.prompts_seen = []

    def encode_image(self, pixels):
        return F.normalize(pixels.mean(dim=(2, 3)), dim=-1)

    def encode_text(self, prompts):
        self.prompts_seen += prompts
        rows = [[float(name in p) for name in COLOURS] for p in prompts]
        return F.normalize(torch.tensor(rows) + 1e-3, dim=-1)


@pytest.fixture
def colour_folder(tmp_path):
    for name, rgb in COLOURS.items():
        (tmp_path / name).mkdir()
        for i in range(3):
            Image.new("RGB", (20, 12), rgb).save(tmp_path / name / f"{i}.png")
    return tmp_path


def test_prompt_ensemble_classifies_an_image_folder(colour_folder):
    model = ColourModel()
    metrics = zero_shot_accuracy(model, ZeroShotSettings(root=str(colour_folder), templates="cifar", batch_size=4))
    assert metrics == {"top1": 100.0, "top5": 100.0, "images": 9.0, "classes": 3.0}
    assert len(model.prompts_seen) == 3 * 18 and "a blurry photo of a green." in model.prompts_seen


def test_class_names_file_follows_the_sorted_folder_order(colour_folder, tmp_path_factory):
    # Folders sort as blue, green, red; naming them red, blue, green makes every top-1 wrong.
    names = tmp_path_factory.mktemp("names") / "classnames.txt"
    names.write_text("red\nblue\ngreen\n")
    settings = ZeroShotSettings(root=str(colour_folder), classnames=str(names), templates=["{}"], max_per_class=2)
    metrics = zero_shot_accuracy(ColourModel(), settings)
    assert metrics["top1"] == 0.0 and metrics["top5"] == 100.0 and metrics["images"] == 6.0


def test_class_embeddings_average_normalised_prompts():
    model = ColourModel()
    embeddings = class_embeddings(model, ["red", "blue"], ["a {}.", "the {} one"])
    assert embeddings.shape == (2, 3)
    assert torch.allclose(embeddings.norm(dim=-1), torch.ones(2))
    assert embeddings[0].argmax() == 0 and embeddings[1].argmax() == 2


def test_template_sets():
    assert len(TEMPLATE_SETS["openai_imagenet"]) == 80 and len(set(TEMPLATE_SETS["openai_imagenet"])) == 80
    assert len(TEMPLATE_SETS["cifar"]) == 18
    assert all("{}" in t for templates in TEMPLATE_SETS.values() for t in templates)


def test_zeroshot_errors_are_one_line(colour_folder, tmp_path):
    with pytest.raises(ConfigError, match=r"unknown template set 'cifr'.*Did you mean 'cifar'"):
        ZeroShotSettings.from_config({"root": str(colour_folder), "templates": "cifr"})
    with pytest.raises(ConfigError, match=r"needs \{\} where the class name goes"):
        ZeroShotSettings.from_config({"templates": ["a photo"]})
    with pytest.raises(ConfigError, match=r"unknown key 'zeroshot.every_n_epoch'.*Did you mean 'every_n_epochs'"):
        ZeroShotSettings.from_config({"every_n_epoch": 2})
    (tmp_path / "names.txt").write_text("only one\n")
    with pytest.raises(ConfigError, match=r"1 names for 3 class folders"):
        read_image_folder(colour_folder, tmp_path / "names.txt")
    with pytest.raises(ConfigError, match=r"no image folder at"):
        read_image_folder(tmp_path / "absent")


@pytest.mark.skipif(not CIFAR.is_dir(), reason=f"the shared data folder is absent ({CIFAR})")
@pytest.mark.slow
def test_zero_shot_on_cifar10_during_fit_and_from_the_command_line(tmp_path, capsys):
    run = tmp_path / "run"
    zeroshot = [f"zeroshot.root={CIFAR}", "zeroshot.max_per_class=3", "zeroshot.templates=cifar"]
    assert main(["fit", str(TINY), "--run-dir", str(run), *zeroshot]) == 0
    during_fit = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= during_fit["val/zeroshot_top1"] <= during_fit["val/zeroshot_top5"] <= 100.0

    checkpoint = run / "checkpoints" / "last.ckpt"
    standalone = tmp_path / "zeroshot"
    assert main(["zeroshot", str(TINY), f"ckpt_path={checkpoint}", "--run-dir", str(standalone), *zeroshot]) == 0
    metrics = json.loads((standalone / "metrics.json").read_text())
    assert metrics["zeroshot/images"] == 30 and metrics["zeroshot/classes"] == 10
    # The same checkpoint on the same images: the same accuracy as the fit's last validation.
    assert metrics["zeroshot/top1"] == pytest.approx(during_fit["val/zeroshot_top1"])
    assert metrics["zeroshot/top5"] == pytest.approx(during_fit["val/zeroshot_top5"])
    printed = capsys.readouterr().out
    assert "30 images, 10 classes" in printed and "zeroshot/top1" in printed

    assert main(["zeroshot", str(TINY)]) == 2  # no zeroshot.root: one-line error
    assert "zeroshot.root is not set" in capsys.readouterr().err
