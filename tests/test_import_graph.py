"""The package's import graph, read with ast (no module is imported): no circle,
and every import points down the layers below, naming the two modules where one
does not. Imports inside functions count: a lazy import is still a dependency.

Layers, top first (README.md, Layout): CLIs -> distill -> training -> evaluation
(evaluate, metrics, inception) -> loader -> interop -> checkpoint -> unet/diffusion
-> sampling -> nn -> runtime -> ops -> kernels, _ext and reference. A module may import its own layer or any layer below it;
the leaves (files.py, data.py, ...) import nothing of fastddpm and anyone may
import them. A submodule never imports its own package's __init__ (nor an
enclosing one): that __init__ may import the submodule, a circle.

KNOWN lists the violations the code has today (none), each with the change that
removes it; an entry that no longer holds fails too, so the list stays true.
"""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TREES = {"fastddpm": ROOT / "fastddpm", "fastddpm.kernels": ROOT / "kernels"}  # setup.py installs kernels/ there
EXTENSIONS = {"fastddpm._C"}  # built from csrc/ by setup.py; no .py file to read

# Top first. A name covers its module, or its package and every module in it
# (the bare root "fastddpm", its __init__, covers only itself).
LAYERS = [
    ("CLIs", ["fastddpm", "fastddpm.train", "fastddpm.sample", "fastddpm.convert", "fastddpm.plot"]),
    ("distillation", ["fastddpm.distill"]),
    ("training", ["fastddpm.training"]),
    ("evaluation", ["fastddpm.evaluate", "fastddpm.metrics", "fastddpm.inception", "fastddpm.inception_weights"]),
    ("loader", ["fastddpm.loader"]),
    ("interop", ["fastddpm.interop"]),
    ("checkpoint", ["fastddpm.checkpoint"]),
    ("model", ["fastddpm.unet", "fastddpm.diffusion"]),
    ("sampling", ["fastddpm.sampling"]),
    ("nn", ["fastddpm.nn"]),
    ("runtime", ["fastddpm.runtime"]),
    ("ops", ["fastddpm.ops"]),
    ("backends", ["fastddpm.kernels", "fastddpm._ext", "fastddpm._C", "fastddpm.reference"]),
]
LEAVES = ["fastddpm.files", "fastddpm.data", "fastddpm.images", "fastddpm.allocator", "fastddpm.assets",
          "fastddpm.limits"]

# (importer, imported): today's violations, each with what removes it. Empty
# since issue 22 phase 2 (loader.py above checkpoint.py and interop.py).
KNOWN = set()


def find_modules(trees=TREES):
    """{module name: path} of every .py file under the trees."""
    mods = {}
    for pkg, top in trees.items():
        for path in sorted(top.rglob("*.py")):
            parts = [pkg, *path.relative_to(top).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            mods[".".join(parts)] = path
    return mods


def read_imports(mods, extensions=EXTENSIONS):
    """{module: {fastddpm module it imports}}; `from P import n` is an import of the
    module P.n where there is one, else of P (its __init__)."""
    known = set(mods) | set(extensions)
    graph = {}
    for name, path in mods.items():
        is_pkg = path.name == "__init__.py"
        edges = graph[name] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = name.split(".")[: len(name.split(".")) - node.level + is_pkg]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
            else:
                continue
            edges.update(t for t in targets if t == "fastddpm" or t.startswith("fastddpm."))
    return graph


def _covers(names, module):
    return any(module == n or (n != "fastddpm" and module.startswith(n + ".")) for n in names)


def place(module):
    """The index of the module's layer (0 = top), "leaf", or None if unplaced."""
    if _covers(LEAVES, module):
        return "leaf"
    best = None
    for i, (_, names) in enumerate(LAYERS):
        for n in names:
            if _covers([n], module) and (best is None or len(n) > len(best[1])):
                best = (i, n)
    return None if best is None else best[0]


def edge_problem(a, b):
    """Why the import a -> b breaks a rule, or None."""
    la, lb = place(a), place(b)
    if la == "leaf":
        return f"{a} imports {b}: {a} is a leaf and imports nothing of fastddpm"
    if b != a and a.startswith(b + "."):
        return f"{a} imports {b}: its own package's __init__"
    if lb != "leaf" and lb < la:
        return f"{a} imports {b}: upward ({LAYERS[la][0]} may import only its own layer and those below it, " \
               f"and {LAYERS[lb][0]} is above)"
    return None


def circles(graph):
    """The strongly connected components of more than one module (Tarjan), sorted."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def problems(graph, known=frozenset()):
    """Every broken rule of the graph, one line each, leaving out the `known` edges."""
    found = []
    for a in sorted(graph):
        for m in [a, *sorted(graph[a])]:
            if place(m) is None:
                found.append(f"{m} is in no layer: add it to LAYERS or LEAVES in tests/test_import_graph.py")
        for b in sorted(graph[a]):
            why = edge_problem(a, b) if place(a) is not None and place(b) is not None else None
            if why and (a, b) not in known:
                found.append(why)
    rest = {a: {b for b in bs if (a, b) not in known} for a, bs in graph.items()}
    for comp in circles(rest):
        ties = ", ".join(f"{a} -> {b}" for a in comp for b in sorted(rest[a]) if b in comp)
        found.append(f"circle of {len(comp)} modules: {ties}")
    return sorted(set(found))


def test_the_package_imports_only_down_and_in_no_circle():
    graph = read_imports(find_modules())
    assert "fastddpm.training.trainer" in graph and "fastddpm.kernels.group_norm" in graph  # it read both trees
    found = problems(graph, KNOWN)
    assert not found, "imports against the layering (README.md, Layout):\n" + "\n".join(found)


def test_every_known_violation_still_holds():
    """A KNOWN entry that the code no longer has must leave the list (else it would
    excuse the violation coming back)."""
    graph = read_imports(find_modules())
    in_circle = {m for comp in circles(graph) for m in comp}
    stale = [f"{a} -> {b}" for a, b in sorted(KNOWN)
             if b not in graph.get(a, ()) or (edge_problem(a, b) is None and not {a, b} <= in_circle)]
    assert not stale, "no longer violations: remove them from KNOWN in tests/test_import_graph.py: " + ", ".join(stale)


def test_today_the_known_violations_are_what_keeps_the_graph_from_passing():
    """Without the allow-list the checker reports exactly those imports and their circles."""
    found = "\n".join(problems(read_imports(find_modules())))
    for a, b in KNOWN:
        assert f"{a} imports {b}" in found or f"{a} -> {b}" in found, (a, b, found)


def test_the_loader_sits_above_checkpoint_and_interop():
    """The circle checkpoint <-> interop (load() read diffusers folders through
    interop, which built on checkpoint) is gone: loader imports both, neither
    imports it, and checkpoint imports no interop."""
    graph = read_imports(find_modules())
    assert {"fastddpm.checkpoint", "fastddpm.interop"} <= graph["fastddpm.loader"]
    assert "fastddpm.loader" not in graph["fastddpm.checkpoint"] | graph["fastddpm.interop"]
    assert "fastddpm.interop" not in graph["fastddpm.checkpoint"]
    assert graph["fastddpm.files"] == set()


@pytest.mark.parametrize("graph, words", [
    ({"fastddpm.ops.x": {"fastddpm.training.trainer"}, "fastddpm.training.trainer": set()},
     "fastddpm.ops.x imports fastddpm.training.trainer: upward (ops"),
    ({"fastddpm.evaluate": {"fastddpm.training.config"}, "fastddpm.training.config": set()},
     "fastddpm.evaluate imports fastddpm.training.config: upward"),
    ({"fastddpm.sampling.step": {"fastddpm.sampling"}, "fastddpm.sampling": set()},
     "fastddpm.sampling.step imports fastddpm.sampling: its own package's __init__"),
    ({"fastddpm.training.trainer": {"fastddpm"}, "fastddpm": set()},
     "fastddpm.training.trainer imports fastddpm: its own package's __init__"),
    ({"fastddpm.files": {"fastddpm.runtime"}, "fastddpm.runtime": set()},
     "fastddpm.files imports fastddpm.runtime: fastddpm.files is a leaf"),
    ({"fastddpm.training.a": {"fastddpm.training.b"}, "fastddpm.training.b": {"fastddpm.training.a"}},
     "circle of 2 modules: fastddpm.training.a -> fastddpm.training.b, fastddpm.training.b -> fastddpm.training.a"),
    ({"fastddpm.newthing": set()}, "fastddpm.newthing is in no layer"),
])
def test_the_checker_names_both_modules_of_a_bad_import(graph, words):
    found = problems(graph)
    assert any(words in line for line in found), found


def test_the_checker_allows_imports_down_and_to_leaves():
    graph = {"fastddpm.train": {"fastddpm.training.trainer", "fastddpm.data"},
             "fastddpm.training.trainer": {"fastddpm.training.config", "fastddpm.evaluate", "fastddpm.runtime"},
             "fastddpm.training.config": {"fastddpm.unet"}, "fastddpm.evaluate": {"fastddpm.images"},
             "fastddpm.runtime": {"fastddpm.ops"}, "fastddpm.ops": {"fastddpm.ops._backend"},
             "fastddpm.ops._backend": {"fastddpm._ext"}, "fastddpm._ext": {"fastddpm._C"}}
    assert problems(graph) == []


def test_imports_are_read_as_python_resolves_them(tmp_path):
    """Relative imports, imports inside functions, `from pkg import submodule` (an
    import of the submodule) and `from pkg import name` (of pkg's __init__)."""
    pkg = tmp_path / "fastddpm"
    (pkg / "sampling").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "runtime.py").write_text("")
    (pkg / "sampling" / "__init__.py").write_text("from .tables import make_plan\n")
    (pkg / "sampling" / "tables.py").write_text("from .. import runtime\n")
    (pkg / "sampling" / "graphs.py").write_text("def f():\n    from fastddpm.sampling import StepState\n"
                                                "    import fastddpm.runtime as r\n    import numpy\n")
    graph = read_imports(find_modules({"fastddpm": pkg}), extensions=set())
    assert graph == {"fastddpm": set(), "fastddpm.runtime": set(),
                     "fastddpm.sampling": {"fastddpm.sampling.tables"},
                     "fastddpm.sampling.tables": {"fastddpm.runtime"},
                     "fastddpm.sampling.graphs": {"fastddpm.sampling", "fastddpm.runtime"}}
