"""Prompt templates for zero-shot classification (``{}`` stands for the class name).

* ``openai_imagenet``: the 80 templates OpenAI's CLIP ensembles for ImageNet (from its
  "Prompt Engineering for ImageNet" notebook; open_clip's ``OPENAI_IMAGENET_TEMPLATES``).
* ``cifar``: the 18 templates CLIP's ``data/prompts.md`` gives for CIFAR-10 and CIFAR-100.
* ``simple``: one template, ``a photo of a {}.``.
* ``cifar10``, ``cifar100`` and ``imagenet1k``: CLIP_benchmark's names for the same lists (its
  ``en_zeroshot_classification_templates.json`` gives exactly these, in this order).

A template list may also come from a file, one template per line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from vlm_lab.errors import ConfigError, did_you_mean

OPENAI_IMAGENET: tuple[str, ...] = (
    'a bad photo of a {}.', 'a photo of many {}.', 'a sculpture of a {}.', 'a photo of the hard to see {}.',
    'a low resolution photo of the {}.', 'a rendering of a {}.', 'graffiti of a {}.',
    'a bad photo of the {}.', 'a cropped photo of the {}.', 'a tattoo of a {}.', 'the embroidered {}.',
    'a photo of a hard to see {}.', 'a bright photo of a {}.', 'a photo of a clean {}.',
    'a photo of a dirty {}.', 'a dark photo of the {}.', 'a drawing of a {}.', 'a photo of my {}.',
    'the plastic {}.', 'a photo of the cool {}.', 'a close-up photo of a {}.',
    'a black and white photo of the {}.', 'a painting of the {}.', 'a painting of a {}.',
    'a pixelated photo of the {}.', 'a sculpture of the {}.', 'a bright photo of the {}.',
    'a cropped photo of a {}.', 'a plastic {}.', 'a photo of the dirty {}.',
    'a jpeg corrupted photo of a {}.', 'a blurry photo of the {}.', 'a photo of the {}.',
    'a good photo of the {}.', 'a rendering of the {}.', 'a {} in a video game.', 'a photo of one {}.',
    'a doodle of a {}.', 'a close-up photo of the {}.', 'a photo of a {}.', 'the origami {}.',
    'the {} in a video game.', 'a sketch of a {}.', 'a doodle of the {}.', 'a origami {}.',
    'a low resolution photo of a {}.', 'the toy {}.', 'a rendition of the {}.', 'a photo of the clean {}.',
    'a photo of a large {}.', 'a rendition of a {}.', 'a photo of a nice {}.', 'a photo of a weird {}.',
    'a blurry photo of a {}.', 'a cartoon {}.', 'art of a {}.', 'a sketch of the {}.', 'a embroidered {}.',
    'a pixelated photo of a {}.', 'itap of the {}.', 'a jpeg corrupted photo of the {}.',
    'a good photo of a {}.', 'a plushie {}.', 'a photo of the nice {}.', 'a photo of the small {}.',
    'a photo of the weird {}.', 'the cartoon {}.', 'art of the {}.', 'a drawing of the {}.',
    'a photo of the large {}.', 'a black and white photo of a {}.', 'the plushie {}.',
    'a dark photo of a {}.', 'itap of a {}.', 'graffiti of the {}.', 'a toy {}.', 'itap of my {}.',
    'a photo of a cool {}.', 'a photo of a small {}.', 'a tattoo of the {}.',
)

CIFAR: tuple[str, ...] = (
    'a photo of a {}.', 'a blurry photo of a {}.', 'a black and white photo of a {}.',
    'a low contrast photo of a {}.', 'a high contrast photo of a {}.', 'a bad photo of a {}.',
    'a good photo of a {}.', 'a photo of a small {}.', 'a photo of a big {}.', 'a photo of the {}.',
    'a blurry photo of the {}.', 'a black and white photo of the {}.', 'a low contrast photo of the {}.',
    'a high contrast photo of the {}.', 'a bad photo of the {}.', 'a good photo of the {}.',
    'a photo of the small {}.', 'a photo of the big {}.',
)

TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "openai_imagenet": OPENAI_IMAGENET,
    "cifar": CIFAR,
    "simple": ("a photo of a {}.",),
    "cifar10": CIFAR,
    "cifar100": CIFAR,
    "imagenet1k": OPENAI_IMAGENET,
}


def resolve_templates(templates: str | Sequence[str]) -> list[str]:
    """A template set's name, a file of templates (one per line), or a list of templates, as the list."""
    if isinstance(templates, str) and templates not in TEMPLATE_SETS and Path(templates).is_file():
        templates = [line.strip() for line in Path(templates).read_text().splitlines() if line.strip()]
    if isinstance(templates, str):
        if templates not in TEMPLATE_SETS:
            raise ConfigError(f"zeroshot.templates: unknown template set {templates!r}."
                              f"{did_you_mean(templates, TEMPLATE_SETS)} Valid: {', '.join(TEMPLATE_SETS)}, a file "
                              f"with one template per line, or a list of templates with {{}} for the class name")
        return list(TEMPLATE_SETS[templates])
    templates = [str(t) for t in templates]
    if not templates or any("{}" not in t for t in templates):
        raise ConfigError(f"zeroshot.templates: each template needs {{}} where the class name goes; got {templates}")
    return templates
