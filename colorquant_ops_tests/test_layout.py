"""The package's layout stays true: no import cycle, and the library never reaches the experiment.

Every ``import`` statement of every module is read from the source (also those inside functions:
a cycle through a function-level import is still a cycle), resolved to the modules of this package
it names, and the graph is checked.
"""

import ast
import subprocess
import sys
from pathlib import Path

import colorquant_ops

PACKAGE = Path(colorquant_ops.__file__).resolve().parent
EXPERIMENT = "colorquant_ops.experiment"
# What the `colorquant` command alone uses; each must live in the experiment subpackage.
COMMAND_LAYER = ("train", "evaluate", "presets", "demo", "quantize_files", "distributed", "data", "sheets", "cli",
                 "rundir", "commands", "arguments", "gradcam")
# The entry point `python -m colorquant_ops` is the command, not the library.
ENTRY_POINTS = {"colorquant_ops.__main__"}
# Compiled modules: leaves of the graph (whether or not this checkout has built them).
EXTENSIONS = ("colorquant_ops._C",)


def _modules() -> dict[str, Path]:
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = ("colorquant_ops",) + path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _known(modules: dict) -> set[str]:
    return set(modules) | set(EXTENSIONS)


def _imports(name: str, path: Path, modules: dict) -> set[str]:
    """The modules of this package that ``name`` imports anywhere in its source."""
    is_package = path.name == "__init__.py"
    known = _known(modules)
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            # `from X import Y` imports the submodule X.Y when there is one, else a name of X
            targets = [f"{origin}.{alias.name}" if f"{origin}.{alias.name}" in known else origin
                       for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in modules and t != name)  # extensions import nothing back
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]):
    """One import cycle as a list of modules, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def _is_experiment(name: str) -> bool:
    return name == EXPERIMENT or name.startswith(EXPERIMENT + ".")


def test_the_graph_sees_imports():
    # guards the parser itself: these edges exist, function-level ones included
    graph = _graph()
    assert "colorquant_ops.ops" in graph["colorquant_ops"]
    assert "colorquant_ops.models.colorcnn" in graph["colorquant_ops.models"]
    assert "colorquant_ops.experiment.cli" in graph["colorquant_ops.__main__"]
    assert "colorquant_ops.experiment.data.archives" in graph["colorquant_ops.experiment.data.locations"]
    assert "colorquant_ops" not in graph["colorquant_ops._extension"]  # `from . import _C`: the extension
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_library_never_imports_the_experiment():
    offending = [f"{name} imports {target}" for name, targets in sorted(_graph().items())
                 if not _is_experiment(name) and name not in ENTRY_POINTS
                 for target in sorted(targets) if _is_experiment(target)]
    assert not offending, "; ".join(offending)


def test_command_layer_lives_in_one_subpackage():
    modules = _modules()
    for short in COMMAND_LAYER:
        assert f"{EXPERIMENT}.{short}" in modules, f"{short} is not in {EXPERIMENT}"
        assert f"colorquant_ops.{short}" not in modules, f"colorquant_ops.{short} sits beside the library"


def test_importing_the_library_loads_no_experiment_module():
    code = ("import sys, colorquant_ops, colorquant_ops.transforms, colorquant_ops.losses, colorquant_ops.codecs, "
            "colorquant_ops.quantizers, colorquant_ops.models, colorquant_ops.normalization; "
            f"print(sorted(m for m in sys.modules if m.startswith({EXPERIMENT!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
