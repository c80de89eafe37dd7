"""The runnable code blocks of the documentation, and how to run them (used by tests/test_docs.py).

A page marks a fenced block as runnable with an HTML comment on the line before it, which Markdown
renderers do not show::

    <!-- runnable -->
    ```bash
    vlm-lab check experiments/quickstart.yaml
    ```

and may show the output the suite compares, marked the same way (``numbers``: compare with every
number masked, for figures that differ at the small settings)::

    <!-- output -->
    ```text
    config OK: ...
    ```

Attributes of ``runnable`` (shell-quoted):

- ``small="key=value ..."``: bash only; appended to each ``vlm-lab fit|validate|test|check|eval``
  line, so the page shows the real command and the suite runs a small one;
- ``replace='OLD => NEW'`` (repeatable): a text substitution before running, for Python blocks;
- ``exit=N``: the exit status a bash block must end with (default 0);
- ``needs=PATH``: skip the page where PATH (relative to the repository root) is absent;
- ``slow``: mark the page's test slow.

The blocks of one page run in order, in one sandbox (a folder whose entries link to the checkout's,
so that relative paths such as ``experiments/...`` and ``../shared/data`` resolve), Python blocks in
one namespace, bash blocks each in a fresh ``bash -e``.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"^\s*<!--\s*(runnable|output)\b(.*?)-->\s*$")
FENCE = re.compile(r"^(\s*)(`{3,})\s*([\w+-]*)")
STAGE_COMMAND = re.compile(r"^\s*vlm-lab\s+(fit|validate|test|check|eval)\b")


@dataclass
class Block:
    page: Path
    line: int
    language: str
    code: str
    attributes: dict[str, str] = field(default_factory=dict)
    replacements: list[tuple[str, str]] = field(default_factory=list)
    output: str | None = None
    output_mode: str = "exact"

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    def source(self) -> str:
        """The code as the suite runs it: replacements made, small settings appended."""
        code = self.code
        for old, new in self.replacements:
            if old not in code:
                raise AssertionError(f"{self.where}: replace={old!r} does not occur in the block")
            code = code.replace(old, new)
        small = self.attributes.get("small")
        if small and self.language == "bash":
            code = "\n".join(f"{line} {small}" if STAGE_COMMAND.match(line) else line for line in code.splitlines())
        return code


def pages() -> list[Path]:
    """Every Markdown page of the site, and the results pages it includes from beside the experiments."""
    found = sorted((ROOT / "docs").rglob("*.md"))
    found += [ROOT / "README.md", ROOT / "CHANGELOG.md", ROOT / "notebooks" / "README.md",
              ROOT / "benchmarks" / "README.md", *sorted((ROOT / "experiments").rglob("*.md"))]
    return [page for page in found if page.is_file()]


def blocks(page: Path) -> list[Block]:
    """The runnable blocks of ``page``, each with the output shown for it (if any)."""
    lines = page.read_text().splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        marker = MARKER.match(lines[i])
        if not marker:
            plain_fence = FENCE.match(lines[i])
            if plain_fence:  # an unmarked block: skip it whole, markers shown inside it are examples
                ticks = plain_fence.group(2)
                i += 1
                while i < len(lines) and not lines[i].strip().startswith(ticks):
                    i += 1
            i += 1
            continue
        kind, attribute_text = marker.group(1), marker.group(2)
        j = i + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        fence = FENCE.match(lines[j]) if j < len(lines) else None
        if fence is None:
            raise AssertionError(f"{page.relative_to(ROOT)}:{i + 1}: <!-- {kind} --> must come right before a fenced block")
        indent, ticks, language = fence.groups()
        end = j + 1
        while end < len(lines) and not lines[end].strip().startswith(ticks):
            end += 1
        code = "\n".join(line[len(indent):] for line in lines[j + 1:end])
        tokens = shlex.split(attribute_text)
        if kind == "runnable":
            if language not in ("bash", "python"):
                raise AssertionError(f"{page.relative_to(ROOT)}:{j + 1}: runnable blocks are bash or python, not {language!r}")
            block = Block(page, j + 1, language, code)
            for token in tokens:
                key, _, value = token.partition("=")
                if key == "replace":
                    old, sep, new = value.partition(" => ")
                    if not sep:
                        raise AssertionError(f"{block.where}: replace should be 'OLD => NEW', got {value!r}")
                    block.replacements.append((old, new))
                elif key in ("small", "exit", "needs", "slow"):
                    block.attributes[key] = value
                else:
                    raise AssertionError(f"{block.where}: unknown runnable attribute {key!r}")
            found.append(block)
        else:
            if not found or found[-1].output is not None:
                raise AssertionError(f"{page.relative_to(ROOT)}:{j + 1}: <!-- output --> without a runnable block before it")
            found[-1].output = code
            found[-1].output_mode = tokens[0] if tokens else "exact"
            if found[-1].output_mode not in ("exact", "numbers"):
                raise AssertionError(f"{page.relative_to(ROOT)}:{j + 1}: output mode is exact or numbers")
        i = end + 1
    return found


def normalise(text: str, mode: str) -> list[str]:
    lines = [line.rstrip() for line in text.strip("\n").splitlines()]
    if mode == "numbers":
        lines = [" ".join(re.sub(r"\d+(\.\d+)?", "#", line).split()) for line in lines]
    return lines


def shows(actual: str, expected: str, mode: str) -> bool:
    """Whether the lines of ``expected`` occur, one after another, in ``actual``."""
    want, got = normalise(expected, mode), normalise(actual, mode)
    return any(got[k:k + len(want)] == want for k in range(len(got) - len(want) + 1))
