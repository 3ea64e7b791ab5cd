"""No code path of lorafleet unpickles: torch.load only with weights_only=True, no pickle/joblib/dill loads,
YAML only through safe loaders. Checked on the source's syntax tree, so a new call site fails here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGES = ["cluster", "training", "tuning", "serving", "evaluation", "benchmarks"]
UNPICKLERS = {("pickle", "load"), ("pickle", "loads"), ("joblib", "load"), ("dill", "load"), ("dill", "loads"),
              ("cloudpickle", "load"), ("cloudpickle", "loads")}  # fmt: skip


def calls(repo: Path):
    for package in PACKAGES:
        for path in sorted((repo / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                    owner = node.func.value
                    name = owner.id if isinstance(owner, ast.Name) else getattr(owner, "attr", None)
                    yield path.relative_to(repo), node.lineno, name, node.func.attr, node


def keyword(node: ast.Call, name: str):
    return next((k.value for k in node.keywords if k.arg == name), None)


def test_torch_load_always_refuses_pickled_code(repo):
    found = [(p, n) for p, n, owner, attr, _ in calls(repo) if (owner, attr) == ("torch", "load")]
    assert found, "the checkpoint loader (training/worker.py) should be found: is the scan still working?"
    for path, line, owner, attr, node in calls(repo):
        if (owner, attr) == ("torch", "load"):
            flag = keyword(node, "weights_only")
            assert isinstance(flag, ast.Constant) and flag.value is True, (
                f"{path}:{line}: torch.load without weights_only=True"
            )


def test_nothing_unpickles_or_loads_unsafe_yaml(repo):
    bad = [f"{p}:{n} {o}.{a}" for p, n, o, a, _ in calls(repo) if (o, a) in UNPICKLERS]
    for path, line, owner, attr, node in calls(repo):
        if (owner, attr) in (("yaml", "load"), ("yaml", "unsafe_load"), ("yaml", "full_load")):
            loader = keyword(node, "Loader")
            if attr != "load" or not (
                isinstance(loader, ast.Attribute) and loader.attr in ("SafeLoader", "CSafeLoader")
            ):
                bad.append(f"{path}:{line} yaml.{attr}")
    assert not bad, "unpickling or unsafe YAML: " + ", ".join(bad)


@pytest.mark.parametrize("source, expected", [("torch.load(p)", 1), ("torch.load(p, weights_only=True)", 0)])
def test_the_scan_sees_a_bare_torch_load(tmp_path, source, expected):
    (tmp_path / "cluster").mkdir()
    (tmp_path / "cluster" / "x.py").write_text(f"import torch\n{source}\n")
    for package in PACKAGES[1:]:
        (tmp_path / package).mkdir()
    unsafe = [
        n for *_, o, a, n in calls(tmp_path) if (o, a) == ("torch", "load") and keyword(n, "weights_only") is None
    ]
    assert len(unsafe) == expected
