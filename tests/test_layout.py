"""The import rules of README.md, checked: the core never imports an engine or an adapter."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = ["dmi/session.py", "dmi/ring", "dmi/drain", "dmi/sinks", "dmi/reader", "dmi/spec.py", "dmi/hooknames.py",
        "dmi/adapter.py", "dmi/errors.py", "dmi/hookpoint.py", "dmi/progress.py", "kernels", "policies"]
ENGINES = ("transformers", "vllm", "sglang", "dmi.adapters", "adapters")


def _imports(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module


def test_core_imports_no_engine_and_no_adapter():
    files = [f for c in CORE for f in ((ROOT / c).rglob("*.py") if (ROOT / c).is_dir() else [ROOT / c])]
    assert len(files) > 15
    bad = [(str(f.relative_to(ROOT)), m) for f in files for m in _imports(f)
           if any(m == e or m.startswith(e + ".") for e in ENGINES)]
    assert bad == []


def test_adapters_do_not_import_each_other():
    for engine_dir in (ROOT / "adapters").iterdir():
        if not engine_dir.is_dir() or engine_dir.name.startswith("__"):
            continue
        others = [f"dmi.adapters.{d.name}" for d in (ROOT / "adapters").iterdir()
                  if d.is_dir() and d.name != engine_dir.name and not d.name.startswith("__")]
        for f in engine_dir.rglob("*.py"):
            assert not [m for m in _imports(f) if any(m.startswith(o) for o in others)], f


def test_wheel_installs_only_dmi_and_matrix_bench(tmp_path):
    """A wheel maps adapters/, kernels/, policies/ under dmi. (package-dir); a top-level `kernels`
    would be taken by transformers for the hub kernels package."""
    import subprocess
    import sys
    import zipfile

    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    wheel = next(tmp_path.glob("dmi-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"dmi", "matrix_bench"}
    for sub in ("dmi/kernels/capture_op.py", "dmi/adapters/hf/tables/qwen3.py", "dmi/policies/filters.py"):
        assert sub in names
