"""The README's launcher snippets (Lightning, Hugging Face Accelerate, torchrun) run as written, on 2 CPU processes.

Each test copies the snippet files out of README.md ("Using syncbn with Lightning, Hugging Face Accelerate and
torchrun", and the Quick start's script as ``train.py``) into a temporary folder and runs the README's command
line for it there, with this interpreter's environment first on PATH. A snippet that breaks, or a command that
does not start two processes, fails here. Lightning and Accelerate come with the dev extra; each test skips where
its framework is not installed.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.syncbn.session_run import run_in_own_session

# Each runs a README snippet under its launcher (about a minute each): `make test-slow` runs them (.ci/run runs that).
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SECTION = "## Using syncbn with Lightning, Hugging Face Accelerate and torchrun"
QUICK_START = "## Quick start: the library in a DDP loop"


def _section(readme: str, heading: str) -> str:
    start = readme.index(heading + "\n")
    end = readme.find("\n## ", start + len(heading))
    return readme[start : end if end != -1 else None]


def _blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.DOTALL)


def readme_snippets() -> tuple[dict[str, str], dict[str, str]]:
    """The section's files (by the name on their first line) and its commands (by the file each one runs)."""
    readme = (REPO / "README.md").read_text()
    section = _section(readme, SECTION)
    files = {"train.py": _blocks(_section(readme, QUICK_START), "python")[0]}
    for block in _blocks(section, "python"):
        name = re.fullmatch(r"# (\S+\.py)", block.splitlines()[0])
        assert name, f"a snippet of the README section must start with '# <file>.py': {block.splitlines()[0]!r}"
        files[name.group(1)] = block
    commands = {}
    for block in _blocks(section, "bash"):
        for line in block.strip().splitlines():
            script = next(word for word in line.split() if word.endswith(".py"))
            commands[script] = line
    assert commands.keys() == files.keys(), "every snippet file has its command, and the other way round"
    return files, commands


def run_readme_command(script: str, tmp_path: Path) -> str:
    files, commands = readme_snippets()
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    bin_dir = str(Path(sys.executable).parent)
    # HF_HOME: no Accelerate config of this machine's user changes the launch.
    result = run_in_own_session(
        ["bash", "-c", f'PATH="{bin_dir}:$PATH" HF_HOME="{tmp_path / "hf"}" {commands[script]}'],
        cwd=tmp_path,
        timeout=180,
    )
    assert result.returncode == 0, f"{commands[script]} failed:\n{result.stdout[-4000:]}"
    return result.stdout


def plain_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


def test_readme_lightning_snippet_trains_on_two_processes(tmp_path: Path) -> None:
    pytest.importorskip("lightning", reason="Lightning is not installed (the dev extra has it)")
    out = run_readme_command("train_lightning.py", tmp_path)
    assert "GLOBAL_RANK: 1" in out, "the second process joined"
    (checkpoint,) = tmp_path.glob("lightning_logs/version_0/checkpoints/*.ckpt")
    state = torch.load(checkpoint, weights_only=False)["state_dict"]
    # 64 samples, batch 8, split over 2 ranks: 4 synchronized steps (8 on a single process).
    assert state["net.1.num_batches_tracked"].item() == 4


def test_readme_accelerate_snippet_trains_on_two_processes(tmp_path: Path) -> None:
    pytest.importorskip("accelerate", reason="Accelerate is not installed (the dev extra has it)")
    run_readme_command("train_accelerate.py", tmp_path)
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    plain_model().load_state_dict(state)  # strict: reverted to plain BatchNorm2d, same keys
    assert state["1.num_batches_tracked"].item() == 4, "64 samples, batch 8, 2 processes: 4 steps each"


def test_readme_torchrun_quick_start_runs_on_two_processes(tmp_path: Path) -> None:
    run_readme_command("train.py", tmp_path)
