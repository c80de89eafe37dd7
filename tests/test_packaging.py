"""The package works outside its clone: ``python -m build`` makes the sdist and, from the sdist, the
wheel; both carry the catalog and the example experiments; the wheel, installed into a second, fresh
virtual environment outside the clone, lists every card, checks the quickstart and fits a few steps
from a temporary directory. An editable install maps the same packages onto the clone's folders.

How the second environment gets torch & co. without the network: it is a plain ``venv`` whose only
link to this test's environment is a ``.pth`` file naming this environment's site-packages folder.
``site`` appends such a line to ``sys.path`` as it is: it does not process the ``.pth`` files inside
that folder, so the hook of this environment's editable install (``__editable__.vlm_lab-*.pth``)
never runs there and the clone's ``vlm_lab`` is not importable. The test checks that assumption
before installing the wheel (``import vlm_lab`` fails), and afterwards that ``vlm_lab`` comes from
the new environment. The wheel goes in with ``pip install --no-deps --no-index --ignore-installed``:
offline, and never touching this environment's install (``--ignore-installed`` uninstalls nothing).

The build runs ``--no-isolation`` (offline, with this environment's setuptools, which the ``dev``
extra pins) on a copy of the clone's files as git sees them (tracked and untracked-but-not-ignored),
so nothing is written into the clone.
"""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CARDS = sorted(p.relative_to(ROOT / "registry").as_posix() for p in (ROOT / "registry").glob("*/*.yaml"))
EXPERIMENTS = sorted(p.name for p in (ROOT / "experiments").glob("*.yaml"))
# The packages whose source folders sit outside vlm_lab/ (setup.cfg package_dir).
DATA_PACKAGES = {"vlm_lab.catalog": "registry", "vlm_lab.experiments": "experiments"}


def test_setup_cfg_lists_every_package():
    """setup.cfg lists the packages by hand (find: cannot see the data packages): a sub-package of
    vlm_lab/ missing from the list would be missing from the wheel."""
    options = configparser.ConfigParser()
    options.read(ROOT / "setup.cfg")
    listed = set(options["options"]["packages"].split())
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "vlm_lab").rglob("__init__.py")}
    assert listed == found | set(DATA_PACKAGES), f"setup.cfg [options] packages should be {sorted(found)} + data"
    mapped = dict(line.split(" = ") for line in options["options"]["package_dir"].strip().splitlines())
    assert mapped == DATA_PACKAGES
    assert all((ROOT / folder / "__init__.py").is_file() for folder in DATA_PACKAGES.values())


# --------------------------------------------------------------------------------------------------
# Helpers


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A copy of the clone's files as git sees them: what a fresh clone with these edits would hold."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git clone of vlm-lab to copy its files from")
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    copy = tmp_path_factory.mktemp("packaging") / "src"
    for name in filter(None, listed):
        if (ROOT / name).is_file():  # a tracked file deleted in the work tree is listed too
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, copy / name)
    return copy


def fresh_venv(folder: Path) -> Path:
    """A venv without pip whose only link to this environment is a .pth naming its site-packages."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    python = folder / "bin" / "python"
    site_packages = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             folder).stdout.strip())
    ours = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (site_packages / "_test_environment.pth").write_text("".join(f"{path}\n" for path in ours))
    return python


def clean_env(home: Path) -> dict[str, str]:
    """This process's environment without what would point Python back at the clone, and with a
    HOME and caches of its own."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    home.mkdir(parents=True, exist_ok=True)
    env.update(HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    return env


def run(argv, cwd: Path, env: dict[str, str] | None = None, ok: bool = True, timeout: int = 600):
    done = subprocess.run([str(a) for a in argv], cwd=cwd, env=env or clean_env(cwd / "home"),
                          capture_output=True, text=True, timeout=timeout)
    if ok:
        assert done.returncode == 0, f"{' '.join(map(str, argv))} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def sections(listing: str) -> dict[str, dict[str, list[str]]]:
    """``vlm-lab list`` output as {heading: {name: the row's other words}}."""
    found: dict[str, dict[str, list[str]]] = {}
    for line in listing.splitlines():
        if not line.startswith(" "):
            heading = found.setdefault(line.rstrip(":"), {})
        elif line.strip():
            name, *rest = line.split()
            heading[name] = rest
    return found


def pip_install(python: Path, cwd: Path, *args: str) -> None:
    run([python, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed",
         "--no-warn-script-location", *args], cwd)


def assert_clone_not_importable(python: Path, cwd: Path) -> None:
    before = run([python, "-c", "import vlm_lab"], cwd, ok=False)
    assert before.returncode != 0 and "No module named 'vlm_lab'" in before.stderr, (
        "the new environment must not see the clone's vlm_lab before anything is installed: " + before.stderr[-500:])


# --------------------------------------------------------------------------------------------------
# The wheel round trip


@pytest.mark.slow
def test_sdist_and_wheel_carry_the_catalog_and_the_wheel_runs_outside_the_clone(source, tmp_path):
    dist = tmp_path / "dist"
    # `python -m build` with neither --sdist nor --wheel builds the sdist, then the wheel from it.
    built = run([sys.executable, "-m", "build", "--no-isolation", "--outdir", dist, source], tmp_path)
    assert "Building wheel from sdist" in built.stdout + built.stderr
    (sdist,), (wheel,) = dist.glob("*.tar.gz"), dist.glob("*.whl")

    with tarfile.open(sdist) as archive:
        in_sdist = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    assert {f"registry/{card}" for card in CARDS} <= in_sdist
    assert {f"experiments/{name}" for name in EXPERIMENTS} <= in_sdist
    assert not any(name.startswith("experiments/lit/") for name in in_sdist)  # the clone's own studies stay

    in_wheel = set(zipfile.ZipFile(wheel).namelist())
    assert {f"vlm_lab/catalog/{card}" for card in CARDS} <= in_wheel
    assert {f"vlm_lab/experiments/{name}" for name in EXPERIMENTS} <= in_wheel
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "vlm_lab").rglob("*.py")}
    assert modules <= in_wheel, f"missing from the wheel: {sorted(modules - in_wheel)}"
    assert not any(name.startswith(("registry/", "experiments/", "tests/")) for name in in_wheel)

    python = fresh_venv(tmp_path / "venv")
    work = tmp_path / "work"  # the user's directory: outside the clone, nothing in it
    work.mkdir()
    assert_clone_not_importable(python, work)
    pip_install(python, work, wheel)
    where = run([python, "-c", "import vlm_lab, vlm_lab.shipped as s; print(vlm_lab.__file__); "
                               "print(s.catalog_folder()); print(s.experiments_folder())"], work).stdout.split()
    venv = (tmp_path / "venv").resolve()
    assert all(Path(p).resolve().is_relative_to(venv) for p in where), where
    assert not any(Path(p).resolve().is_relative_to(ROOT) for p in where), where
    assert Path(where[1]).name == "catalog" and Path(where[2]).name == "experiments"

    vlm_lab_cli = tmp_path / "venv" / "bin" / "vlm-lab"
    mine = tmp_path / "my_cards"  # a catalog folder of the user's lists beside the packaged cards
    (mine / "loss").mkdir(parents=True)
    (mine / "loss" / "hot_clip.yaml").write_text("builds: clip\nargs: {init_logit_scale: 4.0}\n")
    env = {**clean_env(work / "home"), "VLM_LAB_CATALOG": str(mine)}
    listing = sections(run([vlm_lab_cli, "list"], work, env).stdout)
    assert listing["loss"]["hot_clip"] == ["card", "->", "clip", str(mine.resolve())]
    for card in CARDS:
        kind, name = card.removesuffix(".yaml").split("/")
        assert listing[kind].get(name, [])[:4:3] == ["card", "built-in"], (card, listing[kind])
    assert set(listing["experiment"]) == {name.removesuffix(".yaml") for name in EXPERIMENTS}
    assert all(Path(path).resolve().is_relative_to(venv) for (path,) in listing["experiment"].values())

    checked = run([vlm_lab_cli, "check", "quickstart"], work)
    assert "config OK: quickstart" in checked.stdout
    fitted = run([vlm_lab_cli, "fit", "quickstart", "data.train_size=128", "data.val_size=32", "data.batch_size=32",
                  "trainer.max_epochs=1", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
                  "--run-dir", "run"], work)
    assert "val/i2t_R@1" in fitted.stdout
    assert (work / "run" / "metrics.json").is_file() and (work / "run" / "checkpoints" / "last.ckpt").is_file()

    missing = run([vlm_lab_cli, "fit", "quickstrat"], work, ok=False)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1
    assert "nor a packaged experiment: " + ", ".join(n.removesuffix(".yaml") for n in EXPERIMENTS) in missing.stderr


@pytest.mark.slow
def test_an_editable_install_maps_the_data_packages_onto_the_clone_folders(source, tmp_path):
    """The mapping itself: vlm_lab.shipped reads a clone's folders directly, so this checks what
    importlib.resources finds. (CI's own `pip install -e` runs the whole suite on an editable install.)"""
    python = fresh_venv(tmp_path / "venv")
    work = tmp_path / "work"
    work.mkdir()
    assert_clone_not_importable(python, work)
    pip_install(python, work, "--no-build-isolation", "-e", source)
    found = run([python, "-c", "import importlib.resources as r, vlm_lab; print(vlm_lab.__file__); "
                               "print(r.files('vlm_lab.catalog')); print(r.files('vlm_lab.experiments'))"],
                work).stdout.split()
    expected = [source / "vlm_lab" / "__init__.py", source / "registry", source / "experiments"]
    assert [Path(p).resolve() for p in found] == [p.resolve() for p in expected]
