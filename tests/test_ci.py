"""CI runs README's test command, and that command installs at the pinned versions."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent


def readme_test_command() -> str:
    lines = [line.strip() for line in (ROOT / "README.md").read_text().splitlines()]
    commands = [line for line in lines if line.startswith("python -m pip install") and line.endswith("pytest tests")]
    assert len(commands) == 1, commands
    return commands[0]


def test_ci_runs_readme_test_command_verbatim():
    assert readme_test_command() in (ROOT / ".ci" / "run").read_text().splitlines()


def test_every_install_of_the_test_command_uses_the_constraints():
    installs = readme_test_command().split(" && ")[:-1]
    assert len(installs) == 3 and all("-c .ci/constraints.txt" in step for step in installs), installs
    pinned = {re.split(r"[=<>]", line)[0].lower().replace("_", "-")
              for line in (ROOT / ".ci" / "constraints.txt").read_text().splitlines()
              if line and not line.startswith("#")}
    assert {"torch", "triton", "transformers", "pytest", "numpy", "setuptools", "mamba-ssm", "einops"} <= pinned
