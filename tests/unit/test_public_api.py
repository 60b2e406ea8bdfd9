"""The curated public API in ``choreo.__all__`` and the package's import layering (by AST walk)."""

from __future__ import annotations

import ast
import importlib
import inspect
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

import choreo
from choreo import errors

PACKAGE = Path(choreo.__file__).resolve().parent

#: Modules whose public classes users need; every one of those classes must be in ``__all__``.
USER_FACING = ("choreo.context", "choreo.errors", "choreo.events", "choreo.publisher", "choreo.routing",
               "choreo.service", "choreo.settings")
#: Core modules: no broker or Redis client at import time (the adapters import those).
CORE = ("choreo", "choreo.errors", "choreo.events", "choreo.schemas", "choreo.wire", "choreo.routing",
        "choreo.context", "choreo.idempotency", "choreo.settings", "choreo.service", "choreo.publisher",
        "choreo.transport", "choreo.transport.memory", "choreo.stores.memory", "choreo.logs")
CLIENT_LIBRARIES = ("confluent_kafka", "redis")



# --- __all__ -------------------------------------------------------------------------------------


def test_all_is_sorted_and_has_no_duplicates() -> None:
    assert choreo.__all__ == sorted(choreo.__all__)
    assert len(choreo.__all__) == len(set(choreo.__all__))


def test_every_name_in_all_is_importable() -> None:
    namespace: dict[str, object] = {}
    exec("from choreo import *", namespace)  # noqa: S102 - exercising star-import is the point
    assert set(choreo.__all__) <= set(namespace)
    for name in choreo.__all__:
        assert getattr(choreo, name) is namespace[name]


def test_every_exported_object_is_defined_in_choreo() -> None:
    for name in choreo.__all__:
        assert getattr(choreo, name).__module__.startswith("choreo."), name


@pytest.mark.parametrize("name", ["Service", "Event", "Publisher",
                                  "BlockingPublisher", "Settings", "Context", "Envelope", "Header",
                                  "Subscription", "ServiceStats", "configure_logging",
                                  "event_context"])
def test_the_names_users_need_are_exported(name: str) -> None:
    assert name in choreo.__all__


def test_every_error_is_exported() -> None:
    defined = {name for name, obj in vars(errors).items()
               if inspect.isclass(obj) and issubclass(obj, errors.ChoreoError)}
    assert defined <= set(choreo.__all__)


@pytest.mark.parametrize("module_name", [
    m for m in USER_FACING])
def test_every_public_class_of_a_user_facing_module_is_exported(module_name: str) -> None:
    module = importlib.import_module(module_name)
    public = {name for name, obj in vars(module).items()
              if inspect.isclass(obj) and obj.__module__ == module_name and not name.startswith("_")}
    assert public <= set(choreo.__all__)


def test_the_package_binds_nothing_public_beyond_all() -> None:
    bound = {name for name, obj in vars(choreo).items()
             if not name.startswith("_") and not isinstance(obj, types.ModuleType)}
    assert bound == set(choreo.__all__)


def test_every_exported_class_and_function_has_its_own_docstring() -> None:
    for name in choreo.__all__:
        obj = getattr(choreo, name)
        # A class's own docstring, not one inherited; a function's is its __doc__.
        assert (vars(obj).get("__doc__") if inspect.isclass(obj) else obj.__doc__), name


# --- layering ------------------------------------------------------------------------------------


def module_files() -> Iterator[tuple[str, Path]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = ["choreo", *path.relative_to(PACKAGE).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        yield ".".join(parts), path


MODULES = dict(module_files())


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base.pop()
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imported(module: str, node: ast.Import | ast.ImportFrom) -> set[str]:
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names}
    source = _resolve(module, MODULES[module].name == "__init__.py", node)
    return {source} | {f"{source}.{alias.name}" for alias in node.names}


def _module_level(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """Statements run at import: the body, including if/try/with blocks, but not def or class bodies."""
    for stmt in body:
        yield stmt
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        for field in ("body", "orelse", "finalbody"):
            children = getattr(stmt, field, None)
            if isinstance(children, list):
                yield from _module_level(children)
        for handler in getattr(stmt, "handlers", []):
            yield from _module_level(handler.body)


def imports_of(module: str, *, module_level: bool) -> set[str]:
    """Names ``module`` imports: at module level (incl. try/if blocks), or anywhere in the file."""
    tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))
    if module_level:
        nodes: Iterator[ast.AST] = _module_level(tree.body)
    else:
        nodes = ast.walk(tree)
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found |= _imported(module, node)
    return found


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_the_walk_finds_every_module_and_sees_imports_inside_try_blocks() -> None:
    assert set(CORE) <= set(MODULES)
    assert "confluent_kafka" in imports_of("choreo.transport.kafka", module_level=True)
    assert "redis.asyncio" in imports_of("choreo.stores.redis", module_level=True)
    assert "choreo.transport.kafka" not in imports_of("choreo.service", module_level=True)
    assert "choreo.transport.kafka" in imports_of("choreo.service", module_level=False)


def test_errors_imports_nothing_from_choreo() -> None:
    assert not [name for name in imports_of("choreo.errors", module_level=False) if _within(name, "choreo")]


@pytest.mark.parametrize("module", CORE)
def test_core_modules_import_no_client_library_at_module_level(module: str) -> None:
    found = imports_of(module, module_level=True)
    assert not [name for name in found for lib in CLIENT_LIBRARIES if _within(name, lib)]


@pytest.mark.parametrize("module", CORE)
def test_core_modules_import_no_adapter_at_module_level(module: str) -> None:
    adapters = ("choreo.transport.kafka", "choreo.stores.redis", "choreo.devstack")
    found = imports_of(module, module_level=True)
    assert not [name for name in found for adapter in adapters if _within(name, adapter)]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_nothing_in_choreo_imports_services_or_tests(module: str) -> None:
    found = imports_of(module, module_level=False)
    assert not [name for name in found if _within(name, "services") or _within(name, "tests")]


@pytest.mark.parametrize("module", sorted(m for m in MODULES if not _within(m, "choreo.cli")))
def test_only_the_cli_imports_the_cli(module: str) -> None:
    assert not [name for name in imports_of(module, module_level=False) if _within(name, "choreo.cli")]


def test_importing_choreo_loads_no_client_library() -> None:
    code = ("import sys, choreo; "
            f"print(','.join(m for m in {CLIENT_LIBRARIES!r} if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            check=True, cwd=PACKAGE.parent)
    assert result.stdout.strip() == ""
