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
