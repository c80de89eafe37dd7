"""The zeroshot evaluator: the prompt ensemble, top-1/top-5/mean per-class recall, class names, the fit suite and `vlm-lab eval`."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import vlm_lab
from vlm_lab.cli import main
from vlm_lab.errors import ConfigError
from vlm_lab.eval.templates import TEMPLATE_SETS, resolve_templates
from vlm_lab.eval.image_folder import read_image_folder
from vlm_lab.eval.suite import format_eval_table, run_evaluators
from vlm_lab.eval.zeroshot import ZeroShotEvaluator, class_embeddings, classification_metrics
from vlm_lab.registry import build
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
    metrics = ZeroShotEvaluator(root=str(colour_folder), templates="cifar", batch_size=4).evaluate(model)
    assert metrics == {"top1": 100.0, "top5": 100.0, "mean_per_class_recall": 100.0, "images": 9.0, "classes": 3.0,
                       "skipped": 0.0}
    assert len(model.prompts_seen) == 3 * 18 and "a blurry photo of a green." in model.prompts_seen


def test_class_names_file_follows_the_sorted_folder_order(colour_folder, tmp_path_factory):
    # Folders sort as blue, green, red; naming them red, blue, green makes every top-1 wrong.
    names = tmp_path_factory.mktemp("names") / "classnames.txt"
    names.write_text("red\nblue\ngreen\n")
    evaluator = ZeroShotEvaluator(root=str(colour_folder), classnames=str(names), templates=["{}"], max_per_class=2)
    metrics = evaluator.evaluate(ColourModel())
    assert metrics["top1"] == 0.0 and metrics["top5"] == 100.0 and metrics["images"] == 6.0


def test_class_embeddings_average_normalised_prompts():
    model = ColourModel()
    embeddings = class_embeddings(model, ["red", "blue"], ["a {}.", "the {} one"])
    assert embeddings.shape == (2, 3)
    assert torch.allclose(embeddings.norm(dim=-1), torch.ones(2))
    assert embeddings[0].argmax() == 0 and embeddings[1].argmax() == 2


def test_template_sets(tmp_path):
    assert len(TEMPLATE_SETS["openai_imagenet"]) == 80 and len(set(TEMPLATE_SETS["openai_imagenet"])) == 80
    assert len(TEMPLATE_SETS["cifar"]) == 18
    assert TEMPLATE_SETS["cifar10"] == TEMPLATE_SETS["cifar100"] == TEMPLATE_SETS["cifar"]
    assert TEMPLATE_SETS["imagenet1k"] == TEMPLATE_SETS["openai_imagenet"]
    assert all("{}" in t for templates in TEMPLATE_SETS.values() for t in templates)
    own = tmp_path / "templates.txt"
    own.write_text("a {} on a table\n\nitap of a {}\n")
    assert resolve_templates(str(own)) == ["a {} on a table", "itap of a {}"]


def test_mean_per_class_recall_by_hand():
    # Class 0: 2 of 3 right; class 1: 1 of 1 right; the unreadable row (-1) is left out.
    logits = torch.tensor([[2.0, 1.0], [2.0, 1.0], [1.0, 2.0], [1.0, 2.0], [5.0, 0.0]])
    labels = torch.tensor([0, 0, 0, 1, -1])
    metrics = classification_metrics(logits, labels, 2)
    assert metrics["top1"] == pytest.approx(75.0)
    assert metrics["mean_per_class_recall"] == pytest.approx(100.0 * (2 / 3 + 1) / 2)
    assert metrics["top5"] == 100.0
    # A tie goes to the lower class index, whatever the machine.
    assert classification_metrics(torch.tensor([[1.0, 1.0]]), torch.tensor([1]), 2)["top1"] == 0.0


def test_shipped_class_names_and_wordnet_folders(tmp_path):
    for wnid in ("n01440764", "n01443537"):  # ImageNet's tench and goldfish folders
        (tmp_path / wnid).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / wnid / "0.png")
    assert read_image_folder(tmp_path).classnames == ["tench", "goldfish"]
    (tmp_path / "n99999999").mkdir()  # not an ImageNet class: fall back to the folder names
    Image.new("RGB", (8, 8)).save(tmp_path / "n99999999" / "0.png")
    assert read_image_folder(tmp_path).classnames == ["n01440764", "n01443537", "n99999999"]


@pytest.mark.skipif(not CIFAR.is_dir(), reason=f"the shared data folder is absent ({CIFAR})")
def test_cifar10_names_ship():
    folder = read_image_folder(CIFAR, "cifar10", max_per_class=1)
    assert folder.classnames == [d.name for d in sorted(CIFAR.iterdir())]
    with pytest.raises(ConfigError, match=r"the shipped list cifar100 has 100 names for 10 class folders"):
        read_image_folder(CIFAR, "cifar100")


def test_zeroshot_errors_are_one_line(colour_folder, tmp_path):
    with pytest.raises(ConfigError, match=r"unknown template set 'cifr'.*Did you mean 'cifar'"):
        ZeroShotEvaluator(root=str(colour_folder), templates="cifr")
    with pytest.raises(ConfigError, match=r"needs \{\} where the class name goes"):
        ZeroShotEvaluator(root=str(colour_folder), templates=["a photo"])
    with pytest.raises(ConfigError, match=r"eval.evaluators.c10: evaluator 'zeroshot' has no argument 'max_per_clas'.*max_per_class"):
        vlm_lab.load_config(TINY, overrides=[f"eval.evaluators.c10={{name: zeroshot, root: {colour_folder}, max_per_clas: 2}}"])
    with pytest.raises(ConfigError, match=r"unknown evaluator 'zeroshoot'.*Did you mean 'zeroshot'"):
        build("evaluator", {"name": "zeroshoot"})
    (tmp_path / "names.txt").write_text("only one\n")
    with pytest.raises(ConfigError, match=r"1 names for 3 class folders"):
        read_image_folder(colour_folder, str(tmp_path / "names.txt"))
    with pytest.raises(ConfigError, match=r"no image folder at"):
        read_image_folder(tmp_path / "absent")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"class folder .*cls holds no images"):
        read_image_folder(tmp_path / "empty")


def test_an_unreadable_image_is_a_counted_skip(colour_folder):
    (colour_folder / "red" / "broken.png").write_bytes(b"not a png")
    metrics = ZeroShotEvaluator(root=str(colour_folder), templates="simple").evaluate(ColourModel())
    assert metrics["skipped"] == 1.0 and metrics["images"] == 9.0 and metrics["top1"] == 100.0


def test_the_suite_names_each_evaluator(colour_folder):
    evaluators = {"colours": ZeroShotEvaluator(root=str(colour_folder), templates="simple"),
                  "two_each": ZeroShotEvaluator(root=str(colour_folder), templates="simple", max_per_class=2)}
    metrics = run_evaluators(ColourModel(), evaluators)
    assert metrics["eval/colours/top1"] == 100.0 and metrics["eval/colours/images"] == 9.0
    assert metrics["eval/two_each/images"] == 6.0 and metrics["eval/two_each/chance_top1"] == pytest.approx(100 / 3)
    table = format_eval_table(metrics)
    assert "colours/top1" in table and "two_each/mean_per_class_recall" in table and "chance" not in table.split("\n")[3]


@pytest.mark.skipif(not CIFAR.is_dir(), reason=f"the shared data folder is absent ({CIFAR})")
@pytest.mark.slow
def test_zero_shot_on_cifar10_during_fit_and_from_the_command_line(tmp_path, capsys):
    run = tmp_path / "run"
    zeroshot = [f"eval.evaluators.cifar10={{name: zeroshot, root: {CIFAR}, max_per_class: 3, templates: cifar}}"]
    assert main(["fit", str(TINY), "--run-dir", str(run), *zeroshot]) == 0
    during_fit = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= during_fit["eval/cifar10/top1"] <= during_fit["eval/cifar10/top5"] <= 100.0

    checkpoint = run / "checkpoints" / "last.ckpt"
    standalone = tmp_path / "standalone"
    assert main(["eval", str(TINY), f"ckpt_path={checkpoint}", "--run-dir", str(standalone), *zeroshot]) == 0
    metrics = json.loads((standalone / "metrics.json").read_text())
    assert metrics["eval/cifar10/images"] == 30 and metrics["eval/cifar10/classes"] == 10
    # The same checkpoint on the same images: the same accuracy as the fit's last evaluation.
    assert metrics["eval/cifar10/top1"] == pytest.approx(during_fit["eval/cifar10/top1"])
    assert metrics["eval/cifar10/top5"] == pytest.approx(during_fit["eval/cifar10/top5"])
    printed = capsys.readouterr().out
    assert "cifar10/top1" in printed and "cifar10/mean_per_class_recall" in printed

    assert main(["eval", str(TINY)]) == 2  # no evaluators: one-line error
    assert "eval.evaluators is empty" in capsys.readouterr().err
    assert main(["eval", str(TINY), f"eval.evaluators.c={{name: zeroshot, root: {tmp_path / 'absent'}}}"]) == 2
    assert "eval.evaluators.c: zeroshot.root: no image folder at" in capsys.readouterr().err
