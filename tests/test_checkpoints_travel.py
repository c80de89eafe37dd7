"""A checkpoint alone rebuilds its model on another machine, for each kind of model vlm-lab trains.

Each case trains a few steps here, then copies ONLY ``last.ckpt`` into a fresh directory, moves the
data, folders and captions file it was trained from out of the way, and runs in a fresh process
(``tests/elsewhere.py``: another HOME, XDG_CACHE_HOME and working directory, and reading the card
catalog, a package of pretrained weights or anything of this process's directory fails):
``vlm-lab validate`` and ``vlm-lab test`` on other data, ``vlm-lab export`` in every format the
model's towers export to today, ``vlm-lab caption`` for CoCa, ``load_from_checkpoint`` +
``encode_image`` / ``encode_text`` / ``generate``, and one step of fine-tuning (``vlm-lab fit`` with
``model.init_from`` the checkpoint). Every output must equal, bit for bit, what the trained module
gives in this process.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

import vlm_lab
from vlm_lab.data.collate import image_to_tensor
from vlm_lab.interop import export

from datasets_on_disk import COCO_MINI, FLICKR8K, needs_shared
from elsewhere import forbidden_paths, run_elsewhere

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
CAPTIONS = ["a dog runs on the grass", "two people ride bicycles down a street", "x"]
QUIET = ["trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
         "trainer.num_sanity_val_steps=0", "trainer.limit_val_batches=0", "trainer.log_every_n_steps=1",
         "trainer.max_epochs=1", "trainer.max_steps=2"]
TRAINER = "trainer: {accelerator: cpu, enable_progress_bar: false, enable_model_summary: false, "
# Synthetic shapes never seen in training (another seed), for the models trained on synthetic shapes.
SYNTHETIC_DATA = "data: {name: synthetic_shapes, train_size: 8, val_size: 16, test_size: 16, batch_size: 8, seed: 7}\n"
# COCO images and captions, for the models trained on (a few) Flickr8k ones.
COCO_DATA = (f"data: {{name: coco_captions, train_ann: {COCO_MINI}/annotations/captions_train2017.json, "
             f"train_images: {COCO_MINI}/train2017, val_ann: {COCO_MINI}/annotations/captions_val2017.json, "
             f"val_images: {COCO_MINI}/val2017, test_ann: {COCO_MINI}/annotations/captions_val2017.json, "
             f"test_images: {COCO_MINI}/val2017, batch_size: 4, eval_batch_size: 8, num_workers: 0}}\n")


def eval_config(data: str, generation: str) -> str:
    """`vlm-lab validate|test` on other data. The towers are named by constructor: the defaults name
    cards, and the other process may not read the catalog (config loading resolves the names it is given)."""
    return (f"model: {{vision: {{name: clip_vit}}, text: {{name: clip_text}}{generation}}}\n{data}"
            f"{TRAINER}limit_val_batches: 1, limit_test_batches: 1}}\n")


def finetune_config(data: str) -> str:
    """`vlm-lab fit` of one step on other data, from the checkpoint (model.init_from)."""
    return (f"model: {{init_from: last.ckpt}}\n{data}embedding_cache: {{num_workers: 0}}\n"
            f"{TRAINER}max_steps: 1, max_epochs: 1, limit_val_batches: 0, num_sanity_val_steps: 0}}\n")


@dataclass
class Case:
    """One kind of model: how to train it here and what to check elsewhere."""

    files: list[Path]
    overrides: list[str]
    data: str  # the other data it is evaluated and fine-tuned on
    image_size: int
    # The formats `vlm-lab export` writes this model's towers in today. The timm / HF towers of the
    # LiT and CoCa recipes have no exporter yet (issue 16, section 3): when they do, list the formats here.
    exports: tuple[str, ...] = ()
    captions: bool = False  # CoCa: `vlm-lab caption` and generate()
    generation: str = ""  # the evaluation config's model.generation, when captions are scored
    moved: list[Path] = field(default_factory=list)  # what training read, moved away before the other process


def flickr_subset(directory: Path, train: int = 8, val: int = 4) -> dict[str, Path]:
    """A few Flickr8k images and their captions in the layout the recipes read, copied to ``directory``."""
    (directory / "images").mkdir(parents=True)
    paths = {}
    for split, count in (("train", train), ("val", val)):
        source = json.loads((FLICKR8K / "annotations" / f"captions_{split}.json").read_text())
        images = source["images"][:count]
        ids = {image["id"] for image in images}
        for image in images:
            shutil.copy(FLICKR8K / "images" / image["file_name"], directory / "images" / image["file_name"])
        paths[split] = directory / f"captions_{split}.json"
        paths[split].write_text(json.dumps({"images": images,
                                            "annotations": [a for a in source["annotations"] if a["image_id"] in ids]}))
    return paths


def flickr_overrides(paths: dict[str, Path], directory: Path) -> list[str]:
    return [f"data.train_ann={paths['train']}", f"data.train_images={directory / 'images'}",
            f"data.val_ann={paths['val']}", f"data.val_images={directory / 'images'}",
            "data.batch_size=4", "data.eval_batch_size=4", "data.num_workers=0", "embedding_cache.num_workers=0"]


def quickstart(here: Path) -> Case:
    tiny = ["model.vision.layers=1", "model.vision.width=32", "model.vision.heads=2", "model.vision.image_size=32",
            "model.text.layers=1", "model.text.width=32", "model.text.heads=2", "model.embed_dim=16",
            "data.train_size=32", "data.val_size=16", "data.batch_size=8"]
    return Case([EXPERIMENTS / "quickstart.yaml"], tiny, SYNTHETIC_DATA, image_size=32, exports=("hf", "open_clip"))


def lit(here: Path) -> Case:
    paths = flickr_subset(here / "flickr")
    return Case([EXPERIMENTS / "lit" / "flickr8k_lit.yaml"], [*flickr_overrides(paths, here / "flickr"),
                "eval.every_n_epochs=0"], COCO_DATA, image_size=224, exports=("hf", "open_clip"),
                moved=[here / "flickr"])


def coca(here: Path) -> Case:
    paths = flickr_subset(here / "flickr")
    return Case([EXPERIMENTS / "coca_flickr8k.yaml"], [*flickr_overrides(paths, here / "flickr"),
                f"model.tokenizer.train_from={paths['train']}", "model.tokenizer.min_count=1",
                "model.generation.max_new_tokens=8"], COCO_DATA, image_size=224, captions=True,
                generation=", generation: {max_new_tokens: 6, max_images: 4}", moved=[here / "flickr"])


def init_from_hf_clip(here: Path) -> Case:
    from open_clip.tokenizer import default_bpe

    from test_interop import make_hf_clip
    from vlm_lab.interop import clip_tokenizer_from_bpe

    make_hf_clip(here / "clip", clip_tokenizer_from_bpe(default_bpe()), 49407)
    # One activation for both towers: open_clip has a single quick_gelu switch (the export refuses two).
    config = json.loads((here / "clip" / "config.json").read_text())
    config["text_config"]["hidden_act"] = "gelu"
    (here / "clip" / "config.json").write_text(json.dumps(config))
    data = ["data.name=synthetic_shapes", "data.train_size=32", "data.val_size=16", "data.batch_size=8"]
    return Case([], [f"model.init_from={here / 'clip'}", *data], SYNTHETIC_DATA, image_size=32,
                exports=("hf", "open_clip"), moved=[here / "clip"])


CASES = {"quickstart": quickstart, "lit": pytest.param(lit, marks=needs_shared),
         "coca": pytest.param(coca, marks=needs_shared), "init_from_hf_clip": init_from_hf_clip}


def train(case: Case, run_dir: Path) -> vlm_lab.VisionLanguageModule:
    """The recipe trained a few steps, as `vlm-lab fit` trains it; the module, kept in memory."""
    cfg = vlm_lab.load_config(*case.files, overrides=[*case.overrides, *QUIET])
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    module = vlm_lab.build_module(cfg)
    trainer = vlm_lab.build_trainer(cfg, run_dir)
    trainer.fit(module, datamodule=vlm_lab.build_datamodule(cfg, module))
    assert trainer.global_step == 2
    return module.eval()


def evaluate(module: vlm_lab.VisionLanguageModule, config: Path, stage: str, run_dir: Path) -> dict[str, float]:
    """What `vlm-lab validate|test CONFIG ckpt_path=...` reports, for the module in memory."""
    cfg = vlm_lab.load_config(config)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    # The decoding settings are the evaluation config's, as vlm_lab.api._module_to_evaluate sets them.
    module.hparams.model["generation"] = OmegaConf.to_container(cfg.model.generation)
    trainer = vlm_lab.build_trainer(cfg, run_dir)
    getattr(trainer, stage)(module, datamodule=vlm_lab.build_datamodule(cfg, module))
    return vlm_lab.api.read_metrics(run_dir)


def assert_same_export(mine: Path, theirs: Path) -> None:
    """Two exports hold the same model files, byte for byte, and tokenizers that tokenize alike.

    Tokenizer files are compared by what they do: a fast tokenizer saves the truncation and padding of
    its last call, which differ between a tokenizer that has been used and one just loaded. And
    open_clip's config records where the tokenizer was loaded from (``hf_tokenizer_name``, a path of
    the exporting machine; any non-empty value makes ``local-dir:`` load the saved tokenizer).
    """
    from transformers import AutoTokenizer

    tokenizer_files = {"tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "merges.txt",
                       "special_tokens_map.json"}

    def model_files(directory: Path) -> dict[str, object]:
        files: dict[str, object] = {p.name: p.read_bytes() for p in sorted(directory.iterdir())
                                    if p.is_file() and p.name not in tokenizer_files}
        if "open_clip_config.json" in files:
            config = json.loads(files["open_clip_config.json"])
            assert config["model_cfg"]["text_cfg"].pop("hf_tokenizer_name")
            # An HF text tower's config folder inside the export, named by absolute path (open_clip reads it
            # from the current directory): it differs between the two places by design.
            hf_config = config["model_cfg"]["text_cfg"].pop("hf_model_name", None)
            assert hf_config in (None, str((directory / "hf_text_config").resolve()))
            files["open_clip_config.json"] = config
        return files

    assert model_files(theirs) == model_files(mine)
    a, b = (AutoTokenizer.from_pretrained(str(d), local_files_only=True) for d in (mine, theirs))
    assert a.get_vocab() == b.get_vocab() and type(a) is type(b)
    for options in ({}, {"padding": True, "truncation": True, "max_length": 5}):
        assert a(CAPTIONS, **options)["input_ids"] == b(CAPTIONS, **options)["input_ids"]


@pytest.mark.slow
@pytest.mark.parametrize("make_case", CASES.values(), ids=list(CASES))
def test_checkpoint_alone_rebuilds_the_model_elsewhere(make_case, tmp_path, monkeypatch):
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    here.mkdir()
    monkeypatch.chdir(here)
    monkeypatch.setenv("XDG_CACHE_HOME", str(here / "cache"))  # the word vocabulary, the embedding cache
    case = make_case(here)
    module = train(case, here / "run")

    # What the trained module gives in this process.
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(2, 3, case.image_size, case.image_size, generator=generator)
    with torch.no_grad():
        image, text = module.encode_image(pixels), module.encode_text(CAPTIONS)
        generated = module.generate(pixels) if case.captions else None
    image_files = [str(p) for p in sorted((COCO_MINI / "val2017").glob("*.jpg"))[:2]] if case.captions else []
    if case.captions:
        with torch.no_grad():
            captioned = module.generate(torch.stack([image_to_tensor(Image.open(p), module.image_config)
                                                     for p in image_files]))
    for fmt in case.exports:
        export(module, fmt, here / f"export-{fmt}")
    (here / "eval.yaml").write_text(eval_config(case.data, case.generation))
    metrics = {stage: evaluate(module, here / "eval.yaml", stage, here / stage) for stage in ("validate", "test")}

    # Only the checkpoint goes elsewhere; what it was trained from is moved away.
    elsewhere.mkdir()
    shutil.copy(here / "run" / "checkpoints" / "last.ckpt", elsewhere / "last.ckpt")
    (elsewhere / "eval.yaml").write_text(eval_config(case.data, case.generation))
    (elsewhere / "finetune.yaml").write_text(finetune_config(case.data))
    torch.save(pixels, elsewhere / "pixels.pt")
    for path in case.moved:
        path.rename(path.with_name(path.name + ".moved"))
    commands = [[stage, "eval.yaml", "ckpt_path=last.ckpt", "--run-dir", stage] for stage in ("validate", "test")]
    commands += [["export", "--ckpt", "last.ckpt", "--format", fmt, "--out", f"export-{fmt}"] for fmt in case.exports]
    commands.append(["fit", "finetune.yaml", "--run-dir", "finetune"])
    if case.captions:
        commands.append(["caption", "--ckpt", "last.ckpt", *image_files])
    job = {"forbidden": [*forbidden_paths(), str(here)], "commands": commands,
           "api": {"ckpt": "last.ckpt", "pixels": "pixels.pt", "captions": CAPTIONS, "generate": case.captions}}
    results = run_elsewhere(job, elsewhere)

    for command in results["commands"]:
        assert command["status"] == 0, f"{command['argv']}: {command['stderr'][-2000:]}"
    assert torch.equal(results["image"], image) and torch.equal(results["text"], text)
    for stage in ("validate", "test"):
        assert json.loads((elsewhere / stage / "metrics.json").read_text()) == metrics[stage]
        assert any(key.endswith("R@1") for key in metrics[stage])
    for fmt in case.exports:
        assert_same_export(here / f"export-{fmt}", elsewhere / f"export-{fmt}")
    original = torch.load(elsewhere / "last.ckpt", weights_only=True)
    tuned = torch.load(elsewhere / "finetune" / "checkpoints" / "last.ckpt", weights_only=True)
    assert tuned["global_step"] == 1 and tuned["vlm_lab"] == original["vlm_lab"]  # same model, tokenizer
    if case.captions:
        assert results["captions"] == generated
        printed = results["commands"][-1]["stdout"].strip().splitlines()
        assert printed == [f"{path}\t{caption}" for path, caption in zip(image_files, captioned)]
        assert {"test/bleu4", "test/cider"} <= set(metrics["test"])
