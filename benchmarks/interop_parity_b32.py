"""Interop parity at full ViT-B/32 size: vlm-lab against HF CLIPModel and open_clip, both directions.

The unit tests (tests/test_interop.py) use tiny models; this checks the same at the real size, with
random (perturbed) weights since real ones cannot be downloaded here: the openai/clip-vit-base-patch32
architecture as a transformers ``CLIPModel`` (legacy ``eos_token_id`` 2, argmax pooling), and
open_clip's built-in ``ViT-B-32-quickgelu``. Prints the max abs differences of image embeddings,
text embeddings and logits after loading (``*_in``) and after exporting back (``*_out``), with load
and export times. Needs the dev extra (open_clip) and about 4 GB of RAM; 1.5 minutes on 2 CPU cores.

    python benchmarks/interop_parity_b32.py [WORK_DIR]      # default: a temporary directory, removed after
"""

import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import open_clip  # noqa: E402
import torch  # noqa: E402
from open_clip.tokenizer import default_bpe  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import CLIPConfig, CLIPModel  # noqa: E402

import vlm_lab  # noqa: E402
from vlm_lab.interop import clip_tokenizer_from_bpe, export  # noqa: E402

CAPTIONS = ["a photo of a cat", "two small red circles left of a blue square", "a diagram",
            "A DOG, running on the beach!"] * 2


def perturb(model: torch.nn.Module) -> None:
    """Move every parameter off its initial value (LayerNorm gains, biases, q/k/v all distinct)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.02)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def init_from(directory: Path):
    start = time.time()
    module = vlm_lab.build_module(vlm_lab.load_config(overrides=[f"model.init_from={directory}"])).eval()
    return module, round(time.time() - start, 1)


def timed_export(module, fmt: str, out: Path) -> float:
    start = time.time()
    export(module, fmt, out)
    return round(time.time() - start, 1)


def hf_round_trip(root: Path, tokenizer, pixels: torch.Tensor) -> dict:
    config = CLIPConfig(text_config={"eos_token_id": 2, "bos_token_id": 0, "pad_token_id": 1},
                        vision_config={"patch_size": 32}, projection_dim=512)
    reference = CLIPModel(config).eval()
    perturb(reference)
    reference.save_pretrained(root / "hf")
    tokenizer.save_pretrained(root / "hf")
    module, load_s = init_from(root / "hf")
    export_s = timed_export(module, "hf", root / "hf_out")
    exported = CLIPModel.from_pretrained(root / "hf_out").eval()

    batch = tokenizer(CAPTIONS, padding=True, return_tensors="pt")
    with torch.no_grad():
        image, text = module.encode_image(pixels), module.encode_text(CAPTIONS)
        expected, back = reference(**batch, pixel_values=pixels), exported(**batch, pixel_values=pixels)
        logits = module.loss.logit_scale_value() * image @ text.T
    return {
        "hf_in": {"image": max_diff(image, expected.image_embeds), "text": max_diff(text, expected.text_embeds),
                  "logits": max_diff(logits, expected.logits_per_image), "load_s": load_s},
        "hf_out": {"image": max_diff(image, back.image_embeds), "text": max_diff(text, back.text_embeds),
                   "export_s": export_s},
    }


def open_clip_round_trip(root: Path, tokenizer, pixels: torch.Tensor) -> dict:
    reference = open_clip.create_model("ViT-B-32-quickgelu").eval()
    perturb(reference)
    (root / "oc").mkdir()
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(root / "oc" / "open_clip_model.safetensors"))
    model_cfg = open_clip.get_model_config("ViT-B-32-quickgelu")
    (root / "oc" / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
    tokenizer.save_pretrained(root / "oc")
    module, load_s = init_from(root / "oc")
    export_s = timed_export(module, "open_clip", root / "oc_out")
    exported = open_clip.create_model(f"local-dir:{root / 'oc_out'}").eval()

    ids = open_clip.get_tokenizer("ViT-B-32")(CAPTIONS)
    ids_out = open_clip.get_tokenizer(f"local-dir:{root / 'oc_out'}")(CAPTIONS)
    with torch.no_grad():
        image, text = module.encode_image(pixels), module.encode_text(CAPTIONS)
        logits, _ = reference.get_logits(pixels, ids)
        return {
            "open_clip_in": {"image": max_diff(image, reference.encode_image(pixels, normalize=True)),
                             "text": max_diff(text, reference.encode_text(ids, normalize=True)),
                             "logits": max_diff(module.loss.logit_scale_value() * image @ text.T, logits),
                             "load_s": load_s},
            "open_clip_out": {"image": max_diff(image, exported.encode_image(pixels, normalize=True)),
                              "text": max_diff(text, exported.encode_text(ids_out, normalize=True)),
                              "export_s": export_s},
        }


def run(root: Path) -> dict:
    torch.manual_seed(0)
    tokenizer = clip_tokenizer_from_bpe(default_bpe())
    pixels = torch.randn(8, 3, 224, 224)
    return {**hf_round_trip(root, tokenizer, pixels), **open_clip_round_trip(root, tokenizer, pixels)}


def main() -> None:
    if len(sys.argv) > 1:  # keep the four checkpoint directories (about 2.4 GB) for inspection
        root = Path(sys.argv[1])
        root.mkdir(parents=True, exist_ok=True)
        results = run(root)
    else:
        with tempfile.TemporaryDirectory(prefix="interop_b32_") as directory:
            results = run(Path(directory))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
