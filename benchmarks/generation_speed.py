"""Caption generation speed with and without the KV cache (tokens generated per second).

A CoCa of roughly the paper's "base" text shape at reduced depth (clip_text width 512, 6 layers; a
512-wide 6-layer multimodal decoder; 256 image queries over 50 ViT tokens; the MiniLM vocabulary),
random weights. Every caption runs to ``--new-tokens`` (EOS is forbidden until then) so both paths
generate the same number of tokens; the tokens are checked to be identical.

    python benchmarks/generation_speed.py                       # CPU
    python benchmarks/generation_speed.py --device cuda --batch 64 --new-tokens 40
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import vlm_lab
from vlm_lab.generation import CaptionGenerator, GenerationSettings, SpecialTokens


def build(device: str) -> vlm_lab.VisionLanguageModule:
    cfg = vlm_lab.load_config(overrides=[
        "model.vision={name: clip_vit, image_size: 224, patch_size: 32, width: 768, layers: 1, heads: 12}",
        "model.text={name: clip_text, context_length: 77, width: 512, layers: 6, heads: 8}",
        "model.caption_weight=1.0",
        "model.caption_head={name: coca_decoder, layers: 6, heads: 8, image_queries: 256}",
    ])
    torch.manual_seed(0)
    return vlm_lab.build_module(cfg).to(device).eval()


def run(module, tokens, settings: GenerationSettings, repeats: int) -> tuple[float, torch.Tensor]:
    generator = CaptionGenerator(module.text, module.caption_head, SpecialTokens.of(module.tokenizer))
    out = generator.generate(tokens, settings)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        if tokens.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = generator.generate(tokens, settings)
        if tokens.is_cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=30)
    parser.add_argument("--beams", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    module = build(args.device)
    with torch.no_grad():
        images = torch.randn(args.batch, 3, 224, 224, device=args.device)
        tokens = module.vision_tower_output(images).tokens
    rows = []
    for mode, extra in (("greedy", {}), (f"beam{args.beams}", {"num_beams": args.beams})):
        timings = {}
        outputs = {}
        for use_cache in (True, False):
            settings = GenerationSettings(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                          use_cache=use_cache, **extra)
            timings[use_cache], outputs[use_cache] = run(module, tokens, settings, args.repeats)
        assert torch.equal(outputs[True], outputs[False]), "cached and uncached tokens differ"
        generated = args.batch * args.new_tokens  # per returned caption (beams are not counted)
        rows.append({"mode": mode, "device": args.device, "batch": args.batch, "new_tokens": args.new_tokens,
                     "tokens_per_s_cached": round(generated / timings[True], 1),
                     "tokens_per_s_uncached": round(generated / timings[False], 1),
                     "speedup": round(timings[False] / timings[True], 2)})
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
