"""The layering as a test: who may import whom, no import loop, sizes, and torch-free rooms.

Layers, top to bottom: commands (the command-line handlers) > reports > tuner > expertflow. A
module may import its own layer and the ones below, never one above; `expertflow` imports
neither `tuner` nor `reports`. Every import counts, function-level ones too (they hide the real
graph otherwise). The simulator, the study and the report import and run with torch made
unimportable. No module over MAX_MODULE_LINES, no function over MAX_FUNCTION_LINES, except the
ones listed below with their reason.
"""

from __future__ import annotations

import ast
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("efcli", "reports", "tuner", "expertflow")  # top to bottom
LAYER = {"efcli": 3, "reports": 2, "tuner": 1, "expertflow": 0}
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80

# Upward imports still there, each with its reason.
UPWARD_EXCEPTIONS: dict[tuple[str, str], str] = {}
# Modules over MAX_MODULE_LINES, each with its reason.
MODULE_EXCEPTIONS = {
    "expertflow/registry.py": "the model registry's table of aliases (data, not logic)",
    "tuner/profiler/timing.py": "the profiler's CPU and GPU measurements: most of it runs only on a "
                                "GPU, so it is split where a GPU can check the split",
    "expertflow/engine/engine.py": "GraphEngine: attach (with its undo and allocator cap), the model "
                                   "loop, the one-step-behind decisions and generate in one class",
    "expertflow/config.py": "the config schema plus the field introspection the search space reads "
                            "(moved here by issue 12); splitting the schema is expertflow's own layout",
}
# Functions over MAX_FUNCTION_LINES, each with its reason.
FUNCTION_EXCEPTIONS = {
    "tuner/profiler/timing.py:measure_timing": "the timing stages in order, GPU paths included (see "
                                               "its module's reason)",
}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")) if (ROOT / pkg).is_dir() else []:
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `name` imports, anywhere in the file."""
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, set(mods)) for name, path in mods.items()}


def _layer(module: str) -> int:
    return LAYER[module.split(".")[0]]


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
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
    return out


def test_no_import_cycle():
    """No import loop between the project's modules (a package and its own submodules excepted:
    an `__init__` that re-exports its submodules is not a loop)."""
    graph = _graph()
    flat = {m: {t for t in ts if not (t.startswith(m + ".") or m.startswith(t + "."))} for m, ts in graph.items()}
    assert _cycles(flat) == []


def test_no_upward_import():
    graph = _graph()
    upward = sorted((m, t) for m, ts in graph.items() for t in ts if _layer(t) > _layer(m))
    unexplained = [e for e in upward if e not in UPWARD_EXCEPTIONS]
    assert unexplained == [], "imports that run up the layers commands > reports > tuner > expertflow"
    stale = sorted(set(UPWARD_EXCEPTIONS) - set(upward))
    assert stale == [], "listed exceptions that are gone: remove them from UPWARD_EXCEPTIONS"


def test_expertflow_imports_neither_tuner_nor_reports():
    graph = _graph()
    bad = sorted((m, t) for m, ts in graph.items() if m.split(".")[0] == "expertflow"
                 for t in ts if t.split(".")[0] in ("tuner", "reports", "efcli"))
    assert bad == []


def _sizes() -> tuple[dict[str, int], dict[str, int]]:
    modules, functions = {}, {}
    for path in _modules().values():
        rel = path.relative_to(ROOT).as_posix()
        src = path.read_text(encoding="utf-8")
        modules[rel] = len(src.splitlines())
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions[f"{rel}:{node.name}"] = node.end_lineno - node.lineno + 1
    return modules, functions


def test_module_and_function_sizes():
    modules, functions = _sizes()
    big = {m for m, n in modules.items() if n > MAX_MODULE_LINES}
    long = {f for f, n in functions.items() if n > MAX_FUNCTION_LINES}
    assert sorted(big - set(MODULE_EXCEPTIONS)) == [], f"modules over {MAX_MODULE_LINES} lines"
    assert sorted(long - set(FUNCTION_EXCEPTIONS)) == [], f"functions over {MAX_FUNCTION_LINES} lines"
    assert sorted(set(MODULE_EXCEPTIONS) - big) == [], "listed modules now small enough: unlist them"
    assert sorted(set(FUNCTION_EXCEPTIONS) - long) == [], "listed functions now short enough: unlist them"


# ---- torch-free rooms -------------------------------------------------------------------------
NO_TORCH = textwrap.dedent('''
    import sys

    class NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
            return None

    sys.meta_path.insert(0, NoTorch())
''')


def _run_without_torch(code: str, tmp_path: Path) -> None:
    script = tmp_path / "no_torch.py"
    script.write_text(NO_TORCH + textwrap.dedent(code), encoding="utf-8")
    res = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "torch" not in res.stdout.split("modules:")[-1]


def test_simulator_study_and_report_import_without_torch(tmp_path):
    _run_without_torch('''
        import tuner.simulator, tuner.study, tuner.objective, tuner.trials, tuner.storage, tuner.coordination
        import reports.build, reports.data, reports.figures, reports.study_data
        print("modules:", sorted(m for m in sys.modules if m.split(".")[0] == "torch"))
    ''', tmp_path)


def _study_context():
    sys.path.insert(0, str(ROOT / "tests" / "tuner"))
    import _tuner_fixtures as fx

    from expertflow.budget import plan_memory
    from expertflow.config import default_config
    from expertflow.registry import resolve_model
    from tuner.objective import StudyContext
    from tuner.search_space import packaged_space
    from tuner.simulator import Costs

    spec = resolve_model("tiny-qwen2-moe")
    plan = plan_memory(spec, "1GB", max_context_tokens=256, prefill_chunk_tokens=64)
    prof = fx.make_profile(spec.name)
    base = default_config(spec, plan, priors=prof.priors(), profile_id=prof.profile_id, routing="synthetic")
    costs = Costs.from_profile(prof, plan.bytes_per_expert, spec.num_layers)
    sym = {"budget": plan.capacity_experts, "layers": spec.num_layers, "experts": spec.num_experts,
           "total": spec.num_layers * spec.num_experts, "top_k": spec.top_k, "lookahead": prof.trace.lookahead}
    return StudyContext(prof.trace, costs, base, packaged_space(spec.name).resolve(sym), max_decode_tokens=32)


def test_study_runs_and_report_builds_without_torch(tmp_path):
    """A study of a few trials (simulator included) and a report from a tuning folder, torch blocked."""
    ctx_file = tmp_path / "ctx.pkl"
    ctx_file.write_bytes(pickle.dumps(_study_context()))
    _run_without_torch(f'''
        import pickle
        from tuner.study import run_study

        ctx = pickle.loads(open({str(ctx_file)!r}, "rb").read())
        run = run_study(ctx, storage_url="memory", name="s", n_trials=4, progress=False)
        assert run.ran == 4, run.ran
        print("modules:", sorted(m for m in sys.modules if m.split(".")[0] == "torch"))
    ''', tmp_path)


def test_report_builds_without_torch(tmp_path):
    import importlib.util

    sys.path.insert(0, str(ROOT / "tests"))
    spec = importlib.util.spec_from_file_location("_report_fixtures", ROOT / "tests" / "reports" / "conftest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    folder = mod.build_output_folder(tmp_path / "run")
    _run_without_torch(f'''
        from reports.build import build_report

        path = build_report({str(folder)!r}, {str(tmp_path / "report.html")!r})
        assert path.is_file()
        print("modules:", sorted(m for m in sys.modules if m.split(".")[0] == "torch"))
    ''', tmp_path)


def _function_level_imports() -> list[tuple[str, int, str]]:
    """(file, line, source line) of every import of the project's own modules inside a function."""
    out = []
    for path in _modules().values():
        src = path.read_text(encoding="utf-8")
        lines = src.splitlines()
        for fn in ast.walk(ast.parse(src)):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom):
                    own = node.level > 0 or (node.module or "").split(".")[0] in PACKAGES
                elif isinstance(node, ast.Import):
                    own = any(a.name.split(".")[0] in PACKAGES for a in node.names)
                else:
                    continue
                if own:
                    text = " ".join(lines[node.lineno - 1:node.end_lineno])
                    out.append((path.relative_to(ROOT).as_posix(), node.lineno, text.strip()))
    return out


def test_function_level_imports_say_why():
    """An import of the project's own modules inside a function hides the import graph; one is
    allowed only where a dependency must stay lazy (torch, triton, plotly, or a fast --help),
    and then says so in a comment on its line."""
    unexplained = [f"{f}:{n}: {t}" for f, n, t in _function_level_imports() if "#" not in t]
    assert unexplained == []
