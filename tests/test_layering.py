"""Imports run one way (docs/architecture.md): a backward import fails this test.

Parsed with `ast`, so lazy imports inside functions count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = {"core", "preprocessing", "pipeline", "model", "training", "cluster", "testing"}
# package -> the packages of ours it may import (itself always allowed)
ALLOWED = {
    "core": set(),
    "preprocessing": {"core"},
    "model": {"core"},
    "pipeline": {"core", "preprocessing"},
    "training": {"core", "model"},
    "cluster": set(),
    "testing": {"core", "preprocessing", "pipeline", "model", "training"},
}


def imported_packages(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name.split(".")[0]) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module.split(".")[0]))
    return [(line, pkg) for line, pkg in out if pkg in OURS]


def violations(package: str) -> list[str]:
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for line, pkg in imported_packages(path):
            if pkg != package and pkg not in ALLOWED[package]:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {pkg}")
    return bad


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_run_one_way(package):
    assert (ROOT / package).is_dir(), f"{package}/ is missing: update ALLOWED"
    assert violations(package) == []


def test_checker_sees_backward_imports(tmp_path, monkeypatch):
    # The checker itself must be able to fail: plant a model -> training import (lazy, in a function).
    pkg = tmp_path / "model"
    pkg.mkdir()
    (pkg / "bad.py").write_text("def f():\n    from training.checkpoint import save\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    assert violations("model") == ["model/bad.py:2 imports training"]


def test_config_errors_name_the_dotted_path_from_the_nesting():
    from core.config import ConfigError, load_config
    from training.config import TrainConfig

    for override, field in [("unet.head_dim=7", "unet.head_dim"), ("optim.lr=-1", "optim.lr"),
                            ("data.num_workers=-2", "data.num_workers")]:
        with pytest.raises(ConfigError) as err:
            load_config(TrainConfig, None, [override])
        assert err.value.field == field
        assert f"'{field}'" in str(err.value)


def test_prep_config_errors_name_the_dotted_path():
    from core.config import ConfigError, load_config
    from pipeline.config import PrepConfig

    cases = [("video.frames=0", "video.frames"), ("execution.workers=-1", "execution.workers"),
             ("http.retries=-1", "http.retries"), ("models.batch_size=0", "models.batch_size")]
    for override, field in cases:
        with pytest.raises(ConfigError) as err:
            load_config(PrepConfig, None, [override])
        assert err.value.field == field, str(err.value)
