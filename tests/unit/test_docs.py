"""The docs: generated blocks current, links that resolve, the README's two commands the ones CI runs."""
from __future__ import annotations

import re
import urllib.parse
from pathlib import Path

from tools import docs

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"


def test_generated_blocks_are_current():
    assert docs.stale() == [], "run python tools/docs.py"


def test_support_matrix_names_every_registry_entry_and_the_tested_hosts():
    from kernels.registry import REGISTRY, TESTED_COMFYUI
    text = README.read_text()
    for entry in REGISTRY:
        assert f"| {entry.label} |" in text, entry.label
    assert all(v in text for v in TESTED_COMFYUI)


def test_every_relative_link_resolves():
    broken = []
    for path in docs.DOCS:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text()):
            if not re.match(r"[a-z]+:", target) and not (path.parent / urllib.parse.unquote(target)).exists():
                broken.append(f"{path.relative_to(ROOT)}: {target}")
    assert not broken, broken


def test_readme_test_command_is_the_one_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    command = re.search(r"^TEST_CMD=\((.*?)\)", ci, re.M).group(1)
    assert f"\n{command}\n" in README.read_text()
    assert len(README.read_text().splitlines()) <= 400


def test_a_python_without_the_requirements_gets_one_line(tmp_path):
    """The test command run by a Python that lacks torch: one line naming what is missing and the README's
    venv, not a collection error per test module. (A torch that raises ImportError stands in for none.)"""
    import os
    import subprocess
    import sys
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("raise ImportError('No module named torch')\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "tests"], cwd=ROOT, capture_output=True, text=True,
                          env=dict(env, PYTHONPATH=str(tmp_path)), timeout=120)
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert done.returncode == 4 and len(lines) == 1, lines[:20]
    assert "has no torch" in lines[0] and ".venv/bin/python" in lines[0], lines[0]
