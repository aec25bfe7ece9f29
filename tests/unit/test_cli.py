"""The tools' shared argument checks (tools/cli.py): a wrong --out is refused before any work, in one line."""
from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[2] / "tools"
ENTRY = {"train_reference": "train"}  # the function a tool's `__main__` calls, when it is not main()


def tools_with_out() -> dict[str, str]:
    """{tool module: the type its --out has} for every tool that takes --out."""
    found = {}
    for path in sorted(TOOLS.glob("*.py")):
        for kind in re.findall(r'add_argument\("--out", type=([\w.]+)', path.read_text()):
            found[path.stem] = kind
    return found


def run_tool(name: str, argv: list[str], capsys) -> tuple[int, str]:
    module = importlib.import_module(f"tools.{name}")
    with pytest.raises(SystemExit) as stop:
        getattr(module, ENTRY.get(name, "main"))(argv)
    return stop.value.code, capsys.readouterr().err


def test_every_out_is_checked_when_the_arguments_are_read():
    found = tools_with_out()
    assert {"benchmark", "compare", "demo", "merge_error", "train_reference"} <= set(found), found
    assert set(found.values()) <= {"cli.out_file", "cli.out_dir"}, found


@pytest.mark.parametrize("name", sorted(tools_with_out()))
@pytest.mark.parametrize("case", ["empty", "wrong kind"])
def test_a_wrong_out_is_refused_in_one_line(name, case, tmp_path, capsys):
    """An empty --out, or one naming a folder where a file goes (a file where a folder goes), stops the tool
    while it reads its arguments: exit status 2, one line naming --out."""
    a_file = tmp_path / "a_file.md"
    a_file.write_text("x")
    folder_wanted = tools_with_out()[name] == "cli.out_dir"
    out = "" if case == "empty" else str(a_file if folder_wanted else tmp_path)
    code, err = run_tool(name, ["--out", out], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "argument --out:" in err and ("empty string" if case == "empty" else out) in err, err
    assert a_file.read_text() == "x" and sorted(tmp_path.iterdir()) == [a_file], "nothing written"
