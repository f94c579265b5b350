"""The package's modules import each other one way only: no module imports, at any depth and even inside a
function, a module that imports it back."""

import ast
import os

import recbole_dccl

PACKAGE_DIR = os.path.dirname(recbole_dccl.__file__)


def module_names():
    """Every module of the package by dotted name, with its file."""
    modules = {}
    for folder, _, files in os.walk(PACKAGE_DIR):
        for file in files:
            if file.endswith(".py"):
                parts = os.path.relpath(os.path.join(folder, file), PACKAGE_DIR)[:-3].split(os.sep)
                name = ".".join(["recbole_dccl", *parts])
                modules[name.removesuffix(".__init__")] = os.path.join(folder, file)
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
