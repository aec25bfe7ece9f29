"""tools/workflows.fit_sizes: a node the frontend draws taller pushes its column down, nothing else moves."""
from tools.workflows import fit_sizes


def _wf():
    node = lambda i, x, y, w, h: {"id": i, "pos": [x, y], "size": [w, h]}
    return {"nodes": [node(1, 0, 0, 300, 200), node(2, 0, 260, 300, 100), node(3, 400, 260, 300, 100),
                      node(4, 0, -300, 300, 100)]}


def test_a_grown_node_pushes_the_nodes_below_it_in_its_column():
    wf = _wf()
    assert fit_sizes(wf, {"1": [300, 272]})  # keyed as frontend.drawn_sizes keys them
    pos = {n["id"]: n["pos"] for n in wf["nodes"]}
    assert wf["nodes"][0]["size"] == [300, 272]
    assert pos[2] == [0, 332]      # below, same column: down by 72
    assert pos[3] == [400, 260]    # another column: stays
    assert pos[4] == [0, -300]     # above: stays


def test_sizes_as_drawn_change_nothing():
    wf = _wf()
    assert not fit_sizes(wf, {str(n["id"]): list(n["size"]) for n in wf["nodes"]})
    assert wf == _wf()


def test_notes_name_no_frontend_element_that_differs_across_the_supported_hosts():
    """Missing model files: ComfyUI 0.3.64 lists them in a dialog, 0.33 in a side panel; the notes say what both
    do (report each missing file and offer its download) and name neither."""
    import json
    from pathlib import Path
    for path in sorted((Path(__file__).resolve().parents[2] / "workflows").glob("*.json")):
        notes = [n["widgets_values"][0] for n in json.loads(path.read_text())["nodes"]
                 if n["type"] in ("Note", "MarkdownNote")]
        assert notes, path.name
        for text in notes:
            assert not any(word in text.lower() for word in ("dialog", "side panel", "sidebar")), path.name
            if "**Models**" in text:
                assert "ComfyUI reports any missing one when the workflow opens and offers its download" in text, \
                    path.name


def test_workflow_names_are_titles_and_the_quick_start_is_the_readmes():
    """The template browser shows a pack's workflows under their file names and reads nothing else from the
    pack: each name is a title, `<model family> - <what it shows>`; web/templates.js puts the one whose name
    ends in "(start here)" first, and the README's quick start names that one."""
    import re
    from pathlib import Path
    from tools import thumbnails
    root = Path(__file__).resolve().parents[2]
    names = sorted(p.stem for p in (root / "workflows").glob("*.json"))
    assert names and all(re.fullmatch(r"[A-Z][\w.\- ]*[\w.] - \w.*", n) for n in names), names
    assert sorted(p.stem for p in (root / "workflows").glob("*.jpg")) == names
    quick = [n for n in names if n.endswith(thumbnails.QUICK_START)]
    assert len(quick) == 1, quick
    assert f'const QUICK_START = "{thumbnails.QUICK_START}";' in (root / "web" / "templates.js").read_text()
    quick_start = (root / "README.md").read_text().split("## Quick start")[1].split("\n## ")[0]
    assert f"**{quick[0]}**" in quick_start
