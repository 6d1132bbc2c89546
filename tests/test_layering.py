"""Layering: the optimizers import and run their eager backend without triton (an optional
extra), and ``backend="triton"`` then says what to install. (That ``trasmuon_kernels`` imports
nothing of ``trasmuon`` is tests/kernels/test_launch_plans.py's.)"""

import subprocess
import sys
import textwrap


def test_without_triton_the_eager_backend_runs_and_triton_says_what_to_install():
    code = textwrap.dedent('''
        import sys

        class NoTriton:  # as if triton were not installed
            def find_spec(self, name, path, target=None):
                if name == "triton" or name.startswith("triton."):
                    raise ImportError("No module named 'triton'")

        sys.meta_path.insert(0, NoTriton())
        import torch
        import trasmuon

        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Linear(8, 3))
        for cls in (trasmuon.TrasMuon, trasmuon.NAMOD, trasmuon.Muon, trasmuon.AdamW):
            opt = cls(trasmuon.split_params(model))
            for p in model.parameters():
                p.grad = torch.randn_like(p)
            opt.step()
        assert "triton" not in sys.modules
        try:
            trasmuon.TrasMuon(model.parameters(), backend="triton")
        except RuntimeError as e:
            assert "pip install triton" in str(e), e
        else:
            raise AssertionError("backend='triton' without triton was accepted")
        print("ok")
    ''')
    env = {"PATH": "/usr/bin:/bin", "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def _import_graph() -> dict[str, set[str]]:
    """Module -> the modules of trasmuon and trasmuon_kernels it imports, at the top or inside
    a function (both make the import order matter), not under ``if TYPE_CHECKING``."""
    import ast
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    files = {}
    for pkg in ("trasmuon", "trasmuon_kernels"):
        for path in (repo / pkg).rglob("*.py"):
            parts = path.relative_to(repo).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text())
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        typing_only = {id(n) for node in ast.walk(tree)
                       if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                       for n in ast.walk(node)}
        deps = set()
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:  # `from . import reference`: the submodule
                    sub = f"{target}.{alias.name}"
                    deps.add(sub if sub in files else target)
            elif isinstance(node, ast.Import):
                deps.update(alias.name for alias in node.names)
        graph[name] = {d for d in deps if d in files and d != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_two_modules_import_each_other():
    """No circles in the package's imports, directly or around a loop, counting imports
    inside functions (a deferred import is still a dependency both ways). The package
    itself (``trasmuon/__init__.py``) re-exports its modules and is left out as a target."""
    graph = _import_graph()
    for deps in graph.values():
        deps.discard("trasmuon")
        deps.discard("trasmuon_kernels")
    assert not _cycles(graph), _cycles(graph)


def test_the_package_imports_the_modules_it_should():
    graph = _import_graph()
    assert "trasmuon.reference" in graph["trasmuon.stepping"]
    assert {"trasmuon.groups", "trasmuon.checkpoint", "trasmuon.stepping"} <= graph["trasmuon.optimizer"]
    assert "trasmuon.distributed" in graph["trasmuon.optimizer"]  # inside its methods
    assert not any(d.startswith("trasmuon.") for d in graph["trasmuon_kernels.newton_schulz"])
