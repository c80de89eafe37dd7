"""Export parity of the LiT recipe's real pair and of the timm / Hugging Face text combinations.

The model of ``experiments/lit/flickr8k_lit.yaml`` (packaged ImageNet EfficientNet-Lite0 + MiniLM-L6,
heads as initialised with seed 0) is exported to both formats and loaded back with plain
transformers / open_clip, as docs/how-to/export.md shows. Printed: the max abs difference of image
embeddings, text embeddings and logits against the vlm-lab module,

* on the same pixel tensors (vlm-lab's transform of each photo), with real Flickr8k captions;
* through each library's own image path, against vlm-lab's transform of the fully decoded photo:
  ``AutoProcessor`` (hf), timm's transform from ``preprocess_cfg`` (the docs' open_clip snippet) and
  open_clip's own ``preprocess``;
* and against vlm-lab's data modules, which decode large JPEGs at a reduced scale (PIL ``draft``);

for 8 Flickr8k (224x224), 8 COCO (640x480-ish) and 8 CC12M photos (512 px and larger). Then the same
on the same pixels for tiny randomly initialised combinations (timm EfficientNet / ViT test models,
a native ViT, a 2-layer BERT or a native text tower). Last, the ``CLIPImageProcessor`` that an export of native
towers gets, against vlm-lab's transform on the same photos. Needs the dev extra (open_clip) and the
shared data (../shared/data); about 2 minutes of CPU time.

    python benchmarks/export_parity_lit.py
"""

import io
import json
import os
import random
import sys
import tarfile
import tempfile
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import open_clip  # noqa: E402
import timm.data  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import AutoModel, AutoProcessor  # noqa: E402

import vlm_lab  # noqa: E402
from vlm_lab.data.transforms import build_transform, decode_size, open_image  # noqa: E402
from vlm_lab.interop import export  # noqa: E402
from vlm_lab.interop.hf_clip import TEXT_POOLING_RECIPES  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def photos() -> dict[str, list[bytes]]:
    """8 JPEGs (their bytes) from each of Flickr8k, COCO and the CC12M shard."""
    flickr = sorted((DATA / "flickr8k" / "images").glob("*.jpg"))[:8]
    coco = sorted((DATA / "coco-mini" / "val2017").glob("*.jpg"))[:8]
    with tarfile.open(DATA / "cc12m-shard" / "cc12m-train-0000.tar") as shard:
        cc12m = [shard.extractfile(m).read() for m in shard.getmembers() if m.name.endswith(".jpg")][:8]
    return {"flickr8k": [p.read_bytes() for p in flickr], "coco": [p.read_bytes() for p in coco], "cc12m": cc12m}


def captions() -> list[str]:
    annotations = json.loads((DATA / "flickr8k" / "annotations" / "captions_val.json").read_text())["annotations"]
    return [a["caption"] for a in random.Random(0).sample(annotations, 8)]


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach() - b.detach()).abs().max())


def hf_side(out: Path):
    model = AutoModel.from_pretrained(out, local_files_only=True).eval()
    processor = AutoProcessor.from_pretrained(out, local_files_only=True)
    pooling = getattr(model.config, "text_pooling", None)

    def image(pixels):
        return F.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)

    def text(texts):
        batch = processor(text=texts, return_tensors="pt", padding=True, truncation=True)
        hidden = model.text_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        if pooling is None:
            return F.normalize(model.text_projection(hidden.pooler_output), dim=-1)
        mask = batch["attention_mask"].to(hidden.last_hidden_state.dtype)
        pooled = eval(TEXT_POOLING_RECIPES[pooling], {"torch": torch, "hidden": hidden.last_hidden_state,
                                                      "mask": mask})
        return F.normalize(model.text_projection(pooled), dim=-1)

    def prepare(images):
        return processor(images=images, return_tensors="pt")["pixel_values"]

    return image, text, model.logit_scale.exp(), {"AutoProcessor": prepare}


def open_clip_side(out: Path, truncate_at: int | None = None):
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    model.eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}", context_length=truncate_at)
    cfg = json.loads((out / "open_clip_config.json").read_text())["preprocess_cfg"]
    transform = timm.data.create_transform(input_size=(3, cfg["size"], cfg["size"]), crop_pct=cfg["crop_pct"],
                                           interpolation=cfg["interpolation"], mean=cfg["mean"], std=cfg["std"])

    def text(texts):
        ids = tokenizer(texts)
        if truncate_at is not None:  # the docs' recipe for a native text tower
            ids = F.pad(ids, (0, model.context_length - truncate_at), value=tokenizer.tokenizer.pad_token_id)
        return model.encode_text(ids, normalize=True)

    return (lambda pixels: model.encode_image(pixels, normalize=True), text, model.logit_scale.exp(),
            {"timm transform (docs)": lambda images: torch.stack([transform(i) for i in images]),
             "open_clip preprocess": lambda images: torch.stack([preprocess(i) for i in images])})


def same_pixels(module, side, pixels, texts) -> tuple[float, float, float]:
    image_fn, text_fn, scale, _ = side
    with torch.no_grad():
        image, text = image_fn(pixels), text_fn(texts)
        expected_image, expected_text = module.encode_image(pixels), module.encode_text(texts)
    expected_logits = module.loss.logit_scale_value() * expected_image @ expected_text.T
    return diff(image, expected_image), diff(text, expected_text), diff(scale * image @ text.T, expected_logits)


def lit(work: Path) -> None:
    cfg = vlm_lab.load_config(ROOT / "experiments" / "lit" / "flickr8k_lit.yaml")
    torch.manual_seed(0)
    module = vlm_lab.build_module(cfg).eval()
    transform = build_transform(module.image_config)
    texts = captions()
    sets = photos()
    decoded = {name: [open_image(io.BytesIO(b)) for b in data] for name, data in sets.items()}
    drafted = {name: [open_image(io.BytesIO(b), decode_size(module.image_config)) for b in data]
               for name, data in sets.items()}
    print("LiT recipe (efficientnet_lite0 + minilm_l6, packaged weights), max abs difference vs vlm-lab")
    for fmt in ("hf", "open_clip"):
        out = work / f"lit-{fmt}"
        start, cpu = time.perf_counter(), time.process_time()
        export(module, fmt, out)
        print(f"  {fmt}: export {time.perf_counter() - start:.1f} s wall, {time.process_time() - cpu:.1f} s CPU")
        side = hf_side(out) if fmt == "hf" else open_clip_side(out)
        for name, images in decoded.items():
            pixels = torch.stack([transform(i) for i in images])
            image, text, logits = same_pixels(module, side, pixels, texts)
            print(f"    {name:8s} same pixels: image {image:.1e}  text {text:.1e}  logits {logits:.1e}")
            with torch.no_grad():
                for path, prepare in side[3].items():
                    theirs = side[0](prepare(images))
                    full = module.encode_image(pixels)
                    draft = module.encode_image(torch.stack([transform(i) for i in drafted[name]]))
                    print(f"    {name:8s} {path:22s}: image vs vlm-lab transform {diff(theirs, full):.1e}, "
                          f"vs vlm-lab data modules (draft decode) {diff(theirs, draft):.1e}")


COMBOS = {
    "timm efficientnet + bert mean": ("{name: timm, model_name: test_efficientnet}", "mean"),
    "timm vit + bert mean": ("{name: timm, model_name: test_vit}", "mean"),
    "timm efficientnet + bert cls": ("{name: timm, model_name: test_efficientnet}", "cls"),
    "timm efficientnet + bert pooler": ("{name: timm, model_name: test_efficientnet}", "pooler"),
    "timm efficientnet + clip_text": ("{name: timm, model_name: test_efficientnet}", None),
    "clip_vit + bert mean": ("{name: clip_vit, image_size: 64, patch_size: 16, width: 32, layers: 2, heads: 2}",
                             "mean"),
}


def tiny(work: Path) -> None:
    print("Tiny random combinations (perturbed weights), same pixels, 4 captions; max abs difference vs vlm-lab")
    texts = ["a dog runs through the grass", "two children play in the snow", "x",
             "a very long caption about a man who walks his small brown dog along a river on a sunny day"]
    for name, (vision, pooling) in COMBOS.items():
        text = ("{name: clip_text, layers: 2, width: 32, heads: 2}" if pooling is None else
                f"{{name: hf_text, pooling: {pooling}, config: {{model_type: bert, vocab_size: 30522, "
                f"hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 2, intermediate_size: 64}}}}")
        cfg = vlm_lab.load_config(overrides=[f"model.vision={vision}", f"model.text={text}", "model.embed_dim=16",
                                             "model.tokenizer.max_length=16"])
        torch.manual_seed(0)
        module = vlm_lab.build_module(cfg).eval()
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for parameter in module.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
        pixels = torch.randn(4, 3, *module.image_config.size, generator=torch.Generator().manual_seed(1))
        for fmt in ("hf", "open_clip"):
            out = work / f"{name.replace(' ', '_')}-{fmt}"
            export(module, fmt, out)
            side = hf_side(out) if fmt == "hf" else open_clip_side(out, 16 if pooling is None else None)
            image, text_diff, logits = same_pixels(module, side, pixels, texts)
            print(f"  {name:34s} {fmt:9s}: image {image:.1e}  text {text_diff:.1e}  logits {logits:.1e}")


def native_processor(work: Path) -> None:
    """The CLIPImageProcessor a native-tower export gets, against vlm-lab's transform, on the same photos."""
    from transformers import AutoImageProcessor

    print("Native clip_vit export (224 px, crop_pct 1): CLIPImageProcessor pixels vs vlm-lab's transform")
    cfg = vlm_lab.load_config(overrides=["model.vision.image_size=224", "model.vision.layers=1", "model.text.layers=1"])
    module = vlm_lab.build_module(cfg).eval()
    export(module, "hf", work / "native-hf")
    processor = AutoImageProcessor.from_pretrained(work / "native-hf", local_files_only=True)
    transform = build_transform(module.image_config)
    for name, data in photos().items():
        diffs = []
        for image in (open_image(io.BytesIO(b)) for b in data):
            theirs = processor(image, return_tensors="pt")["pixel_values"][0]
            diffs.append(diff(theirs, transform(image)))
        print(f"  {name:8s}: max abs pixel difference {max(diffs):.1e}; "
              f"{sum(d > 0.1 for d in diffs)} of {len(diffs)} photos shifted by a pixel (> 0.1)")


if __name__ == "__main__":
    if not DATA.is_dir():
        sys.exit(f"needs the shared data at {DATA}")
    with tempfile.TemporaryDirectory() as directory:
        lit(Path(directory))
        tiny(Path(directory))
        native_processor(Path(directory))
