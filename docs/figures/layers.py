"""Draw docs/figures/layers.png from the layer table in vlm_lab/layers.py.

    python docs/figures/layers.py
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

import vlm_lab  # noqa: E402
from vlm_lab.layers import LAYERS, PACKAGE, layer_of, module_names  # noqa: E402

OUT = Path(__file__).resolve().parent / "layers.png"


def short(module: str) -> str:
    """``vlm_lab.eval.templates`` -> ``eval.templates``; the package itself -> ``vlm_lab (__init__)``."""
    return "vlm_lab (__init__)" if module == PACKAGE else module.removeprefix(PACKAGE + ".")


def members(package: str, layer: int, modules: list[str]) -> list[str]:
    """The modules of ``package`` that sit in ``layer`` (a package may lend a module to another layer)."""
    return [m.removeprefix(package + ".") for m in modules
            if m.startswith(package + ".") and layer_of(m) == layer and "." not in m.removeprefix(package + ".")]


def main() -> None:
    modules = sorted(module_names(Path(vlm_lab.__file__).resolve().parent))
    band, gap = 0.62, 0.14
    fig, ax = plt.subplots(figsize=(10, 0.78 * len(LAYERS) + 0.6))
    colours = plt.get_cmap("Blues")
    for index, layer in enumerate(LAYERS):  # bottom first
        y = index * (band + gap)
        shade = colours(0.18 + 0.55 * index / max(1, len(LAYERS) - 1))
        ax.add_patch(FancyBboxPatch((0, y), 8.6, band, boxstyle="round,pad=0.02,rounding_size=0.08",
                                    facecolor=shade, edgecolor="#1f3b57", linewidth=0.8))
        text_colour = "white" if index > len(LAYERS) * 0.6 else "#10233a"
        ax.text(0.15, y + band / 2, layer.name, va="center", ha="left", fontsize=11, fontweight="bold",
                color=text_colour)
        packages = [(m, members(m, index, modules)) for m in layer.modules if m != PACKAGE]
        inside = "; ".join(f"{short(m)}: {', '.join(found)}" for m, found in packages if found)
        ax.text(1.75, y + band / 2 + (0.1 if inside else 0), "   ".join(short(m) for m in layer.modules),
                va="center", ha="left", fontsize=9.5, family="monospace", color=text_colour)
        if inside:
            ax.text(1.75, y + band / 2 - 0.14, inside, va="center", ha="left", fontsize=6.8, family="monospace",
                    color=text_colour)
    top = len(LAYERS) * (band + gap) - gap
    ax.add_patch(FancyArrowPatch((9.1, top - 0.1), (9.1, 0.1), arrowstyle="-|>", mutation_scale=18,
                                 linewidth=1.6, color="#1f3b57"))
    ax.text(9.3, top / 2, "imports point down\n(tests/test_layers.py)", rotation=90, va="center", ha="left",
            fontsize=10, color="#1f3b57")
    ax.set_xlim(-0.1, 9.9)
    ax.set_ylim(-0.1, top + 0.1)
    ax.axis("off")
    ax.set_title("vlm-lab's layers (vlm_lab/layers.py): a module imports its own layer and those below", fontsize=11)
    fig.tight_layout()
    fig.savefig(OUT, dpi=110)
    print(OUT)


if __name__ == "__main__":
    main()
