"""The README's two commands, run as written in a fresh copy of the pack (tracked files only, no venv, no out/).

The setup command builds its venv from the package index (or the local wheels pip is configured with) and
runs the demo; the test command then runs as typed, with that venv's Python and no venv activated. CI runs the
whole suite on a clean clone; here the test command's run is narrowed through PYTEST_ADDOPTS to the docs
tests, so this stays a few minutes.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path


ROOT = Path(__file__).resolve().parents[2]


def readme_commands() -> tuple[str, str]:
    """(setup and demo, tests): the one-line code blocks under the README's two headings."""
    text = (ROOT / "README.md").read_text()
    setup = re.search(r"\*\*Set up and run the demo\*\*.*?```\n(.+?)\n```", text, re.S).group(1)
    tests = re.search(r"\*\*Run the tests\*\*.*?```\n(.+?)\n```", text, re.S).group(1)
    return setup, tests


def fresh_copy(dest: Path) -> Path:
    """The files a clone would have: git's tracked and not-ignored files, or the tree without build output."""
    listing = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True)
    if listing.returncode == 0:
        for name in listing.stdout.splitlines():
            src = ROOT / name
            if src.is_file():
                (dest / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest / name)
    else:
        shutil.copytree(ROOT, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".venv", "out", "__pycache__"))
    return dest


def test_commands_are_one_line_each():
    setup, tests = readme_commands()
    assert "\n" not in setup and "tools/demo.py" in setup and setup.startswith("python3 -m venv .venv ")
    assert tests == ".venv/bin/python -m pytest -q tests"  # the venv the setup command makes, not activated


def test_readme_commands_work_in_a_fresh_copy(tmp_path):
    setup, tests = readme_commands()
    pack = fresh_copy(tmp_path / "pack")
    assert not (pack / ".venv").exists() and not (pack / "out").exists()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "VIRTUAL_ENV", "PYTHONPATH"))}
    done = subprocess.run(setup, shell=True, cwd=pack, env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert (pack / "out" / "demo_side_by_side.png").stat().st_size > 10_000
    env_tests = dict(env, PYTEST_ADDOPTS="-p no:cacheprovider -m unit -k test_docs")
    done = subprocess.run(tests, shell=True, cwd=pack, env=env_tests, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert re.search(r"\d+ passed", done.stdout), done.stdout[-1000:]
