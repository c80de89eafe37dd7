"""Draw docs/figures/architecture.png: how config, registry, towers, heads, losses, module and data fit together.

    python docs/figures/architecture.py
"""

from __future__ import annotations

from pathlib import Path

OUT = Path(__file__).resolve().parent / "architecture.png"

# (x, y, width, height, text, colour): the boxes, in axes units of a 12 x 7 canvas.
BOXES = {
    "entry": (0.3, 5.9, 11.4, 0.8, "vlm-lab CLI  ·  notebooks (vlm_lab.api)  ·  sweeps: one path, vlm_lab/api.py", "#e8e8e8"),
    "config": (0.3, 4.3, 3.2, 1.1, "config\nYAML files + key=value\nchecked: vlm_lab/config.py", "#fde9c9"),
    "registry": (0.3, 2.2, 3.2, 1.4, "registry\nname -> constructor (code)\nor card (registry/*.yaml)", "#fde9c9"),
    "module": (4.2, 1.0, 4.6, 4.4, "", "#dbe9f6"),
    "vision": (4.5, 3.7, 1.9, 0.9, "vision tower\n(locked? cached?)", "#ffffff"),
    "text": (6.6, 3.7, 1.9, 0.9, "text tower", "#ffffff"),
    "heads": (4.5, 2.5, 4.0, 0.8, "projection heads -> joint space\n(+ CoCa caption head)", "#ffffff"),
    "loss": (4.5, 1.3, 4.0, 0.8, "loss: clip | align | siglip\n(+ caption loss)", "#ffffff"),
    "data": (9.4, 3.2, 2.3, 2.2, "data module\nsynthetic | coco | cc3m\ntransforms from the\nvision tower's image_config;\ntokenizer from the module", "#dff0d8"),
    "trainer": (9.4, 1.0, 2.3, 1.6, "lightning.Trainer\ncheckpoints, logs,\nmetrics.json", "#e8e8e8"),
}
ARROWS = [
    ("entry", "config", "load_config"),
    ("config", "registry", "names"),
    ("registry", "module", "build"),
    ("module", "data", "tokenizer,\nimage_config"),
    ("data", "trainer", "batches"),
    ("module", "trainer", "fit / validate / test"),
    ("entry", "trainer", ""),
]


def centre(box: tuple, side: str) -> tuple[float, float]:
    x, y, w, h = box[:4]
    return {"top": (x + w / 2, y + h), "bottom": (x + w / 2, y), "left": (x, y + h / 2),
            "right": (x + w, y + h / 2)}[side]


def draw(out: Path = OUT) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    fig, ax = plt.subplots(figsize=(12, 7), dpi=90)
    ax.set_xlim(0, 12)
    ax.set_ylim(0.6, 7)
    ax.axis("off")
    for name, (x, y, w, h, text, colour) in BOXES.items():
        ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.12",
                                    facecolor=colour, edgecolor="#555555", linewidth=1.2))
        if text:
            ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=10)
    ax.text(6.5, 5.1, "VisionLanguageModule  (vlm_lab/module.py)", ha="center", va="center", fontsize=11,
            weight="bold")
    sides = {("entry", "config"): ("bottom", "top"), ("config", "registry"): ("bottom", "top"),
             ("registry", "module"): ("right", "left"), ("module", "data"): ("right", "left"),
             ("data", "trainer"): ("bottom", "top"), ("module", "trainer"): ("right", "left"),
             ("entry", "trainer"): ("bottom", "top")}
    for source, target, label in ARROWS:
        a, b = sides[(source, target)]
        start, end = centre(BOXES[source], a), centre(BOXES[target], b)
        if (source, target) == ("module", "trainer"):
            start, end = (start[0], 1.8), (end[0], 1.8)
        if (source, target) == ("module", "data"):
            start, end = (start[0], 4.3), (end[0], 4.3)
        if (source, target) == ("entry", "trainer"):
            start, end = (10.55, 5.9), (10.55, 5.4)
        if (source, target) == ("entry", "config"):
            start, end = (1.9, 5.9), (1.9, 5.4)
        ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=16, color="#333333", linewidth=1.3))
        if label:
            ax.text((start[0] + end[0]) / 2 + 0.08, (start[1] + end[1]) / 2 + 0.12, label, fontsize=8.5,
                    color="#333333", ha="left" if start[0] == end[0] else "center", va="bottom")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


if __name__ == "__main__":
    print(draw())
