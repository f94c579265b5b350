"""The code imports one way only: no module of the package, the device runtime, the benchmarks or the probes imports,
at any depth and even inside a function, a module that imports it back; the package imports none of the others,
benchmarks no probe, nothing but tests imports tests; and only the trainer's own modules reach into the trainer's
private attributes (everything else drives it through its public phase methods)."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("recbole_dccl", "dccl_device", "benchmarks", "experiments", "tests")
# Who may import whom, beyond itself and the package (tests may import everything).
MAY_IMPORT = {"recbole_dccl": {"dccl_device"}, "dccl_device": set(), "benchmarks": {"dccl_device"},
              "experiments": {"dccl_device", "benchmarks"}}


def module_names():
    """Every module of the packages by dotted name, with its file."""
    modules = {}
    for package in PACKAGES:
        for folder, _, files in os.walk(os.path.join(ROOT, package)):
            for file in files:
                if file.endswith(".py"):
                    parts = os.path.relpath(os.path.join(folder, file), ROOT)[:-3].split(os.sep)
                    modules[".".join(parts).removesuffix(".__init__")] = os.path.join(folder, file)
    return modules


def imports(path, modules):
    """The package's modules that the module in ``path`` imports (``from p import m`` counts as importing
    module ``p.m`` when there is one, else ``p``)."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in modules else node.module)
    return {name for name in found if name in modules}


def test_the_import_graph_has_no_cycle():
    modules = module_names()
    graph = {name: imports(path, modules) for name, path in modules.items()}
    done, on_path = set(), []

    def visit(name):
        if name in on_path:
            cycle = on_path[on_path.index(name):] + [name]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if name in done:
            return
        on_path.append(name)
        for imported in sorted(graph[name]):
            visit(imported)
        on_path.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)
    assert graph["recbole_dccl.utils"] >= {"recbole_dccl.model.dccl", "recbole_dccl.trainer"}  # the graph is read


def test_each_part_imports_only_what_sits_below_it():
    modules = module_names()
    wrong = []
    for name, path in modules.items():
        package = name.split(".")[0]
        if package == "tests":
            continue
        allowed = {package, "recbole_dccl", *MAY_IMPORT[package]}
        wrong += [(name, target) for target in imports(path, modules) if target.split(".")[0] not in allowed]
    assert not wrong
    assert "benchmarks.synthetic" in imports(modules["benchmarks.device_phase_cost"], modules)  # the graph is read


def private_trainer_attributes(path):
    """``(line, name)`` of every ``<...trainer>._name`` read or written in the module at ``path``."""
    found = []
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            owner = node.value
            owner_name = owner.id if isinstance(owner, ast.Name) else owner.attr if isinstance(owner, ast.Attribute) else ""
            if owner_name.endswith("trainer"):
                found.append((node.lineno, node.attr))
    return found


def test_only_the_trainer_touches_its_private_attributes():
    outside = {name: path for name, path in module_names().items()
               if not name.startswith(("recbole_dccl.trainer", "tests"))}
    touched = {name: private_trainer_attributes(path) for name, path in outside.items()}
    assert {name: found for name, found in touched.items() if found} == {}
    assert private_trainer_attributes(os.path.join(ROOT, "recbole_dccl", "trainer", "cold_start.py")) == []
