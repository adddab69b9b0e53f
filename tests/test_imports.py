"""Every public module imports, and every package lists its public names."""

import importlib
import pkgutil

import pytest

import lit_tune


def _modules():
    names = ["lit_tune", "lit_tune.strategies", "lit_tune.callbacks"]
    for info in pkgutil.walk_packages(lit_tune.__path__, prefix="lit_tune."):
        names.append(info.name)
    return sorted(set(names))


@pytest.mark.parametrize("name", _modules())
def test_module_imports(name):
    importlib.import_module(name)


@pytest.mark.parametrize("name", [n for n in _modules() if importlib.import_module(n).__file__.endswith("__init__.py")])
def test_package_all_sorted_and_defined(name):
    package = importlib.import_module(name)
    exported = getattr(package, "__all__", None)
    assert exported is not None, f"{name} has no __all__"
    assert list(exported) == sorted(exported)
    for symbol in exported:
        assert hasattr(package, symbol), f"{name}.__all__ names missing {symbol}"
