"""``vlm-lab export`` beyond the native CLIP pair: timm vision towers and Hugging Face text towers.

To Hugging Face as a ``VisionTextDualEncoderModel`` (a timm tower inside as ``TimmWrapperModel``,
preprocessing by ``TimmWrapperImageProcessor``) and to open_clip (``TimmModel`` and
``HFTextEncoder``), each compared with the vlm-lab module on the same pixels and captions (<= 1e-5).
Tiny randomly initialised towers (timm's ``test_*`` models, a 2-layer BERT) with perturbed weights
cover the combinations; the LiT recipe's real pair (packaged EfficientNet-Lite0 + MiniLM-L6) runs
the loading snippets of docs/how-to/export.md as they are written, without vlm_lab, on a real photo.
What a format cannot hold (CoCa, some poolings and model_args) is refused with one line.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import vlm_lab  # noqa: E402
from vlm_lab.cli import main  # noqa: E402
from vlm_lab.data.transforms import build_transform, open_image  # noqa: E402
from vlm_lab.errors import ConfigError  # noqa: E402
from vlm_lab.interop import export  # noqa: E402
from vlm_lab.interop.hf_clip import TEXT_POOLING_RECIPES  # noqa: E402

from datasets_on_disk import COCO_MINI, needs_shared  # noqa: E402
from interop_helpers import TOLERANCE, encode, max_diff, perturb, save_checkpoint  # noqa: E402

open_clip = pytest.importorskip("open_clip")  # a dev dependency: CI installs it

ROOT = Path(__file__).resolve().parents[1]
# The last caption is longer than the 16 tokens the tiny models keep: truncation must travel too.
CAPTIONS = ["a dog runs through the grass", "two children play in the snow", "x",
            "a very long caption about a man who walks his small brown dog along a river on a sunny day"]
MAX_LENGTH = 16

EFFICIENTNET = "{name: timm, model_name: test_efficientnet, model_args: {drop_path_rate: 0.1}}"
VIT = "{name: timm, model_name: test_vit}"
NATIVE_VIT = "{name: clip_vit, image_size: 64, patch_size: 16, width: 32, layers: 2, heads: 2}"
NATIVE_TEXT = "{name: clip_text, layers: 2, width: 32, heads: 2}"


def bert(pooling: str) -> str:
    return (f"{{name: hf_text, pooling: {pooling}, config: {{model_type: bert, vocab_size: 30522, hidden_size: 32, "
            f"num_hidden_layers: 2, num_attention_heads: 2, intermediate_size: 64}}}}")


def build(vision: str, text: str, *overrides: str, seed: int = 0):
    cfg = vlm_lab.load_config(overrides=[f"model.vision={vision}", f"model.text={text}", "model.embed_dim=16",
                                         f"model.tokenizer.max_length={MAX_LENGTH}", *overrides])
    torch.manual_seed(seed)
    module = vlm_lab.build_module(cfg).eval()
    perturb(module, seed)
    return module


def pixels_for(module) -> torch.Tensor:
    height, width = module.image_config.size
    return torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(1))


def normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)


# --------------------------------------------------------------------------------------------------
# What a user of each library computes from the export (no vlm_lab involved)


def hf_embeddings(out: Path, pixels: torch.Tensor, captions: list[str]):
    """Image and text embeddings and logits from a Hugging Face export, as its README says."""
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(out, local_files_only=True).eval()
    batch = AutoProcessor.from_pretrained(out, local_files_only=True)(
        text=captions, return_tensors="pt", padding=True, truncation=True)
    pooling = getattr(model.config, "text_pooling", None)
    with torch.no_grad():
        image = normalize(model.get_image_features(pixel_values=pixels).pooler_output)
        if pooling is None:
            text = model.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            text = normalize(text.pooler_output)
        else:  # the recipe of the export's README.md
            hidden = model.text_model(input_ids=batch["input_ids"],
                                      attention_mask=batch["attention_mask"]).last_hidden_state
            mask = batch["attention_mask"].to(hidden.dtype)
            pooled = eval(TEXT_POOLING_RECIPES[pooling], {"torch": torch, "hidden": hidden, "mask": mask})
            text = normalize(model.text_projection(pooled))
        logits = model.logit_scale.exp() * image @ text.T
    return model, batch, image, text, logits


def open_clip_embeddings(out: Path, pixels: torch.Tensor, captions: list[str], truncate_at: int | None = None):
    """``truncate_at``: the docs' recipe for a native text tower, whose open_clip context_length (its
    position count) is longer than the module's max_length: truncate there, pad to context_length."""
    model = open_clip.create_model(f"local-dir:{out}").eval()  # loads the state dict strictly
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}", context_length=truncate_at)
    ids = tokenizer(captions)
    if truncate_at is not None:
        ids = F.pad(ids, (0, model.context_length - truncate_at), value=tokenizer.tokenizer.pad_token_id)
    with torch.no_grad():
        image, text = model.encode_image(pixels, normalize=True), model.encode_text(ids, normalize=True)
        logits, _ = model.get_logits(pixels, ids)
    return model, image, text, logits


def assert_same(module, image, text, logits, pixels, captions):
    expected_image, expected_text = encode(module, pixels, captions)
    assert max_diff(image, expected_image) <= TOLERANCE
    assert max_diff(text, expected_text) <= TOLERANCE
    expected_logits = module.loss.logit_scale_value() * expected_image @ expected_text.T
    assert max_diff(logits, expected_logits) <= TOLERANCE


# --------------------------------------------------------------------------------------------------
# Hugging Face


@pytest.mark.parametrize("vision, text", [
    (EFFICIENTNET, bert("mean")),
    ("{name: timm, model_name: test_vit, model_args: {img_size: 64}}", bert("mean")),
    (EFFICIENTNET, bert("cls")),
    (EFFICIENTNET, bert("eos")),
    (EFFICIENTNET, bert("pooler")),
    (EFFICIENTNET, NATIVE_TEXT),
    (NATIVE_VIT, bert("mean")),
], ids=["effnet-mean", "vit64-mean", "effnet-cls", "effnet-eos", "effnet-pooler", "effnet-clip_text",
        "clip_vit-mean"])
def test_hf_export_matches_vlm_lab(vision, text, tmp_path):
    from transformers import TimmWrapperModel, VisionTextDualEncoderModel

    module = build(vision, text)
    export(module, "hf", tmp_path / "out")
    pixels = pixels_for(module)
    model, batch, image, text_embeds, logits = hf_embeddings(tmp_path / "out", pixels, CAPTIONS)
    assert isinstance(model, VisionTextDualEncoderModel)
    assert isinstance(model.vision_model, TimmWrapperModel) == ("timm" in vision)
    # The processor's tokenizer truncates where the module does.
    assert torch.equal(batch["input_ids"], module.tokenize(CAPTIONS)["input_ids"])
    assert_same(module, image, text_embeds, logits, pixels, CAPTIONS)

    card = tmp_path / "out" / "README.md"
    pooling = getattr(module.text, "pooling", "pooler")
    if pooling in TEXT_POOLING_RECIPES:
        assert model.config.text_pooling == pooling and f"**{pooling} pooling**" in card.read_text()
        # What the recipe is for: the model's own text path (the BERT pooler) gives other embeddings.
        with torch.no_grad():
            own = model.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        assert max_diff(normalize(own.pooler_output), text_embeds) > 1e-2
    else:
        assert not card.exists()


@needs_shared
@pytest.mark.parametrize("image_config", [None, "{crop_pct: 1.0, interpolation: bilinear}"], ids=["timm", "changed"])
def test_hf_processor_prepares_a_photo_as_vlm_lab(tmp_path, image_config):
    """A 640x426 COCO photo: TimmWrapperImageProcessor runs timm's eval transform, as vlm-lab's data does,
    with the tower's own data config or the fields its ``image_config`` changed."""
    from PIL import Image
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    vision = EFFICIENTNET if image_config is None else EFFICIENTNET[:-1] + f", image_config: {image_config}}}"
    module = build(vision, bert("mean"))
    if image_config is not None:
        assert (module.image_config.crop_pct, module.image_config.interpolation) == (1.0, "bilinear")
    export(module, "hf", tmp_path / "out")
    photo = COCO_MINI / "val2017" / "000000000139.jpg"
    processor = AutoImageProcessor.from_pretrained(tmp_path / "out", local_files_only=True)
    assert type(processor).__name__ == "TimmWrapperImageProcessor"
    assert type(AutoProcessor.from_pretrained(tmp_path / "out", local_files_only=True)).__name__ == \
        "VisionTextDualEncoderProcessor"
    assert AutoTokenizer.from_pretrained(tmp_path / "out", local_files_only=True).model_max_length == MAX_LENGTH
    pixels = processor(Image.open(photo).convert("RGB"))["pixel_values"]
    expected = build_transform(module.image_config)(open_image(photo)).unsqueeze(0)
    assert torch.equal(pixels, expected)  # identical pixels, so identical embeddings


# --------------------------------------------------------------------------------------------------
# open_clip


@pytest.mark.parametrize("vision, text, extra", [
    (EFFICIENTNET, bert("mean"), ()),
    (VIT, bert("mean"), ()),
    (EFFICIENTNET, bert("cls"), ("model.vision_head.bias=true",)),
    (EFFICIENTNET, bert("pooler"), ()),
    (EFFICIENTNET, NATIVE_TEXT, ()),
    (NATIVE_VIT, bert("mean"), ()),
], ids=["effnet-mean", "vit-mean", "effnet-cls-head_bias", "effnet-pooler", "effnet-clip_text", "clip_vit-mean"])
def test_open_clip_export_matches_vlm_lab(vision, text, extra, tmp_path):
    module = build(vision, text, *extra)
    export(module, "open_clip", tmp_path / "out")
    config = json.loads((tmp_path / "out" / "open_clip_config.json").read_text())
    # A native text tower's context_length is its position count; the module truncates earlier.
    truncate_at = MAX_LENGTH if "clip_text" in text else None
    pixels = pixels_for(module)
    model, image, text_embeds, logits = open_clip_embeddings(tmp_path / "out", pixels, CAPTIONS, truncate_at)
    assert type(model).__name__ == ("CustomTextCLIP" if "hf_text" in text else "CLIP")
    assert type(model.visual).__name__ == ("TimmModel" if "timm" in vision else "VisionTransformer")
    assert_same(module, image, text_embeds, logits, pixels, CAPTIONS)
    if "hf_text" in text:
        text_cfg = config["model_cfg"]["text_cfg"]
        assert Path(text_cfg["hf_model_name"]) == (tmp_path / "out" / "hf_text_config").resolve()
        assert text_cfg["hf_model_pretrained"] is False and text_cfg["context_length"] == MAX_LENGTH
    if "timm" in vision:
        assert config["model_cfg"]["vision_cfg"]["timm_model_pretrained"] is False


# --------------------------------------------------------------------------------------------------
# The command line, and what is refused


def test_cli_exports_a_lit_checkpoint_in_both_formats(tmp_path, capsys):
    module = build(EFFICIENTNET, bert("mean"))
    save_checkpoint(module, tmp_path / "last.ckpt")
    pixels = pixels_for(module)
    for fmt in ("hf", "open_clip"):
        out = tmp_path / fmt
        assert main(["export", "--ckpt", str(tmp_path / "last.ckpt"), "--format", fmt, "--out", str(out)]) == 0
        assert f"wrote {fmt} model to {out}" in capsys.readouterr().out
        if fmt == "hf":
            _, _, image, text, logits = hf_embeddings(out, pixels, CAPTIONS)
        else:
            _, image, text, logits = open_clip_embeddings(out, pixels, CAPTIONS)
        assert_same(module, image, text, logits, pixels, CAPTIONS)


COCA = ["model.caption_weight=1.0", "model.caption_head={name: coca_decoder, layers: 1, heads: 2, image_queries: 4}"]


@pytest.mark.parametrize("vision, text, extra, fmt, message", [
    (NATIVE_VIT, NATIVE_TEXT, COCA, "hf", r"export hf: the model has a CocaCaptionHead caption head \(CoCa\), "
                                           r"which this format cannot hold: transformers has no CoCa model class"),
    (NATIVE_VIT, NATIVE_TEXT, COCA, "open_clip", r"export open_clip: the model has a CocaCaptionHead caption head "
                                                 r"\(CoCa\), .*open_clip's CoCa decoder differs"),
    ("{name: timm, model_name: test_vit, model_args: {img_size: 32}}", bert("mean"), [], "open_clip",
     r"model_args \['img_size'\] cannot be written: open_clip's TimmModel passes only drop_path_rate"),
    (EFFICIENTNET, bert("eos"), [], "open_clip",
     r"pools with 'eos', which open_clip's HFTextEncoder has no pooler for; supported: mean, cls, pooler"),
    (EFFICIENTNET, bert("mean"), ["model.text_head.bias=true"], "open_clip", "text_head is a linear head with a bias"),
    (EFFICIENTNET, bert("mean"), ["model.vision_head.bias=true"], "hf", "vision_head is a linear head with a bias"),
    (EFFICIENTNET, "{name: hf_text, pooling: mean, config: {model_type: distilbert, vocab_size: 30522, dim: 32, "
                   "n_layers: 1, n_heads: 2, hidden_dim: 64}}", [], "open_clip",
     "the hf_text tower is a 'distilbert' model; open_clip's HFTextEncoder holds bert, roberta, xlm-roberta"),
], ids=["coca-hf", "coca-open_clip", "timm-model_args", "eos-pooling", "text-head-bias", "vision-head-bias",
        "distilbert"])
def test_parts_a_format_cannot_hold_are_refused_in_one_line(vision, text, extra, fmt, message, tmp_path):
    cfg = vlm_lab.load_config(overrides=[f"model.vision={vision}", f"model.text={text}", "model.embed_dim=16",
                                         *extra])
    with pytest.raises(ConfigError, match=message) as error:
        export(vlm_lab.build_module(cfg), fmt, tmp_path / "out")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------
# The LiT recipe's real pair, through the snippets of docs/how-to/export.md


def doc_snippets() -> dict[str, str]:
    """The Python blocks of docs/how-to/export.md marked ``<!-- tested: NAME -->``."""
    text = (ROOT / "docs" / "how-to" / "export.md").read_text()
    return dict(re.findall(r"<!-- tested: (\w+) -->\s*```python\n(.*?)```", text, flags=re.S))


def run_without_vlm_lab(code: str, cwd: Path) -> dict[str, torch.Tensor]:
    """Run a snippet in a fresh interpreter where ``import vlm_lab`` fails; return what it computed."""
    assert "vlm_lab" not in code
    program = ("import sys\nsys.modules['vlm_lab'] = None  # plain transformers / open_clip only\n" + code +
               "\ntorch.save({'image': image_embeds, 'text': text_embeds, 'logits': logits_per_image}, "
               "'result.pt')\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", program], cwd=cwd, env=env, check=True, timeout=600)
    return torch.load(cwd / "result.pt", weights_only=True)


@pytest.mark.slow
@needs_shared
def test_lit_recipe_exports_run_with_the_documented_snippets(tmp_path):
    """The packaged EfficientNet-Lite0 and MiniLM-L6 of experiments/lit/flickr8k_lit.yaml, exported by
    the CLI from a checkpoint, loaded by the docs' code on a real photo: the same embeddings and logits."""
    cfg = vlm_lab.load_config(ROOT / "experiments" / "lit" / "flickr8k_lit.yaml")
    torch.manual_seed(0)
    module = vlm_lab.build_module(cfg).eval()
    save_checkpoint(module, tmp_path / "last.ckpt")
    snippets = doc_snippets()
    assert set(snippets) == {"hf", "open_clip"}
    photo = COCO_MINI / "val2017" / "000000000139.jpg"
    shutil.copy(photo, tmp_path / "photo.jpg")
    captions = re.search(r"captions = (\[.*?\])", snippets["hf"], flags=re.S).group(1)
    captions = eval(captions)
    pixels = build_transform(module.image_config)(open_image(photo)).unsqueeze(0)
    for fmt, out in (("hf", "lit-hf"), ("open_clip", "lit-open_clip")):
        assert main(["export", "--ckpt", str(tmp_path / "last.ckpt"), "--format", fmt,
                     "--out", str(tmp_path / out)]) == 0
        result = run_without_vlm_lab(snippets[fmt], tmp_path)
        assert_same(module, result["image"], result["text"], result["logits"], pixels, captions)
