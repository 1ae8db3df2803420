"""The code's shape: the linter configured in ruff.toml, imports that go one way, small modules."""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULES = {path.stem: path for path in ROOT.glob("*.py")}  # the flat top-level modules
MAX_MODULE_LINES = 650
COMMANDS = ("train", "infer")  # what users run; no module imports them (train is infer's library)


def test_ruff_finds_nothing():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]


def project_imports(path: Path) -> set[str]:
    """Top-level modules `path` imports anywhere in it, function bodies included."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names & set(MODULES) - {path.stem}


def test_imports_go_one_way():
    graph = {name: project_imports(path) for name, path in MODULES.items()}
    importers = {name: sorted(m for m, deps in graph.items() if name in deps) for name in COMMANDS}
    assert importers == {"train": ["infer"], "infer": []}
    done, path = set(), []

    def visit(name):  # depth-first; a module met again on the current path closes a cycle
        assert name not in path, "import cycle: " + " -> ".join(path[path.index(name):] + [name])
        if name not in done:
            path.append(name)
            for dep in sorted(graph[name]):
                visit(dep)
            path.pop()
            done.add(name)

    for name in sorted(graph):
        visit(name)


def test_modules_stay_small():
    sizes = {name: len(path.read_text().splitlines()) for name, path in MODULES.items()}
    assert {n: s for n, s in sizes.items() if s > MAX_MODULE_LINES} == {}
