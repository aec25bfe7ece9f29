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


# ---- corrupt weights: one line from reference_dit.load_weights, and from every tool that loads weights --------

def corrupt_weights(kind: str, folder: Path) -> Path:
    from tools import reference_dit as R
    path = folder / f"{kind.replace(' ', '_')}.safetensors"
    if kind == "truncated":
        path.write_bytes(R.WEIGHTS_PATH.read_bytes()[:100_000])
    elif kind == "garbage":
        path.write_bytes(bytes(range(256)) * 40)
    elif kind == "another model's":
        import torch
        from safetensors.torch import save_file
        save_file({"weight": torch.zeros(3)}, str(path))
    return path


KINDS = ["truncated", "garbage", "another model's"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_corrupt_weights_file_gives_one_line(kind, tmp_path):
    from tools import reference_dit as R
    path = corrupt_weights(kind, tmp_path)
    for load in (R.load_weights, lambda p: R.build_model(weights=p)):
        with pytest.raises(R.WeightsError) as e:
            load(path)
        assert str(path) in str(e.value) and "\n" not in str(e.value), str(e.value)


# (tool, its arguments, the weights it loads: a key of reference_dit.MODELS or an argument that names a file)
WEIGHT_USERS = [
    ("demo", ["--model", "64px"], "64px"),
    ("compare", ["--model", "64px", "--sections", "reference"], "64px"),
    ("merge_error", ["--model", "64px"], "64px"),
    ("cache_bar", ["--model", "64px"], "64px"),
    ("train_reference", ["--init-from"], "argument"),
    ("train_reference", ["--evaluate", "--out"], "argument"),
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name, argv, weights", WEIGHT_USERS)
def test_every_tool_that_loads_weights_refuses_a_corrupt_file_in_one_line(name, argv, weights, kind, tmp_path,
                                                                        capsys, monkeypatch):
    from tools import reference_dit as R
    path = corrupt_weights(kind, tmp_path)
    if weights == "argument":
        argv = [*argv, str(path)]
    else:
        monkeypatch.setitem(R.MODELS, weights, path)
    code, err = run_tool(name, argv, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert str(path) in err and "not a reference-model safetensors file" in err, err


def test_the_tools_that_load_weights_are_all_covered():
    """Every tool that loads the reference model's weights checks them with cli.weights_file, and is tested above."""
    loaders = {p.stem for p in TOOLS.glob("*.py") if p.stem not in ("reference_dit", "cli")
               and re.search(r"load_weights|build_model|reference_model\(", p.read_text())}
    assert loaders == {n for n, _, _ in WEIGHT_USERS}, loaders
    assert all("cli.weights_file(" in (TOOLS / f"{n}.py").read_text() for n in loaders)
