"""README.md and CI must agree: CI runs exactly the commands the README gives."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_ci_runs_the_readme_install_and_test_commands():
    commands = readme_commands()
    test_command = next(c for c in commands if c.endswith("&& pytest"))
    install, run_tests = [part.strip() for part in test_command.split("&&")]
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert install in ci and run_tests in ci
    assert ci.index(install) < ci.index(run_tests)


def test_quickstart_command_names_files_that_exist():
    quickstart = next(c for c in readme_commands() if "vlm-lab fit" in c)
    assert "-c constraints.txt" in quickstart
    config = quickstart.split("vlm-lab fit", 1)[1].split()[0]
    assert (ROOT / config).is_file()
    assert (ROOT / "constraints.txt").is_file()


def test_constraints_pin_the_tested_torch_pair():
    pins = (ROOT / "constraints.txt").read_text()
    assert "torch==2.14.1" in pins and "torchvision==0.29.1" in pins
