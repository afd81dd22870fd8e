"""The package's public surface: exports, docstrings, typing marker, import weight."""

from __future__ import annotations

import ast
import configparser
import importlib
import importlib.resources
import importlib.util
import inspect
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import pytest

import dbcancel

PUBLIC_MODULES = [
    "models",
    "backend",
    "checkpoint",
    "errors",
    "jobs",
    "registry",
    "runtime",
    "testing",
]
OPTIONAL_PACKAGES = [
    "sqlalchemy",
    "websockets",
    "flask",
    "django",
    "psycopg",
    "pymysql",
    "alembic",
    "celery",
    "kombu",
    "django_tasks",
    "django_tasks_db",
    "greenlet",
    "asyncpg",
    "aiosqlite",
    "aiomysql",
]
ROOT = Path(dbcancel.__file__).resolve().parent


def isort_key(name: str) -> tuple[int, str]:
    """The order ruff's RUF022 (isort style) keeps ``__all__`` in.

    SCREAMING_CASE constants first, then CamelCase classes, then everything else, each
    group in case-sensitive alphabetical order.
    """
    if name.isupper():
        group = 0
    elif name[:1].isupper():
        group = 1
    else:
        group = 2
    return group, name


def module_assignments(module: ModuleType) -> dict[str, str | None]:
    """Names assigned at module level in ``module``'s source, with their attribute docstring."""
    tree = ast.parse(Path(module.__file__).read_text(encoding="utf-8"))
    found: dict[str, str | None] = {}
    body = tree.body
    for i, node in enumerate(body):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign):
            targets = [node.target]
        doc = None
        nxt = body[i + 1] if i + 1 < len(body) else None
        if (
            isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            doc = nxt.value.value
        for target in targets:
            if isinstance(target, ast.Name):
                found[target.id] = doc
    return found


def type_aliases(module: ModuleType) -> set[str]:
    """The names ``module``'s source declares as type aliases (``Name: TypeAlias = ...``).

    Their value is a class from elsewhere (``JobId`` is ``Hashable``): what documents them
    is the docstring after their assignment, not the class's.
    """
    tree = ast.parse(Path(module.__file__).read_text(encoding="utf-8"))
    return {
        node.target.id
        for node in tree.body
        if isinstance(node, ast.AnnAssign)
        and isinstance(node.target, ast.Name)
        and isinstance(node.annotation, ast.Name)
        and node.annotation.id == "TypeAlias"
    }


def own_docstring(obj: object) -> str | None:
    """The docstring written for ``obj`` itself, not one inherited from a base or a type."""
    if inspect.isclass(obj):
        return obj.__dict__.get("__doc__")
    if inspect.isfunction(obj) or inspect.ismodule(obj):
        return obj.__doc__
    return None


def test_all_is_sorted():
    names = list(dbcancel.__all__)
    assert len(names) == len(set(names)), "duplicates in dbcancel.__all__"
    assert names == sorted(names, key=isort_key)


@pytest.mark.parametrize("module", PUBLIC_MODULES)
def test_module_all_is_sorted(module):
    names = list(importlib.import_module(f"dbcancel.{module}").__all__)
    assert len(names) == len(set(names))
    assert names == sorted(names, key=isort_key)


def test_core_names_are_exported():
    # The names the documentation promises at the top level.
    promised = {
        "Status",
        "CancellableMixin",
        "Jobs",
        "Cancelled",
        "JobNotFound",
        "InvalidTransition",
        "DbcancelError",
        "Checkpoint",
        "checkpoint",
        "current",
    }
    assert promised <= set(dbcancel.__all__)
    assert "TERMINAL" in dbcancel.__all__ or callable(getattr(dbcancel.Status, "terminal", None))


@pytest.mark.parametrize("name", dbcancel.__all__)
def test_every_exported_name_exists_and_is_documented(name):
    assert hasattr(dbcancel, name), f"dbcancel.__all__ lists {name!r}, which does not exist"
    obj = getattr(dbcancel, name)
    aliased = any(
        name in type_aliases(importlib.import_module(f"dbcancel.{m}")) for m in PUBLIC_MODULES
    )
    doc = None if aliased else own_docstring(obj)
    if doc is None:
        # A constant: its docstring is the string literal after its assignment.
        home = next(
            (
                importlib.import_module(f"dbcancel.{m}")
                for m in PUBLIC_MODULES
                if name in module_assignments(importlib.import_module(f"dbcancel.{m}"))
            ),
            None,
        )
        assert home is not None, f"cannot find where {name!r} is defined"
        doc = module_assignments(home)[name]
    assert (doc or "").strip(), f"dbcancel.{name} has no docstring"


def test_package_and_public_modules_have_docstrings():
    assert (dbcancel.__doc__ or "").strip()
    for module in PUBLIC_MODULES:
        mod = importlib.import_module(f"dbcancel.{module}")
        assert (mod.__doc__ or "").strip(), f"dbcancel.{module} has no docstring"


def every_public_module() -> dict[str, Path]:
    """Every module of the package whose dotted name has no private part, by name.

    Read from the source tree, not imported: the Django modules need settings to import.
    ``__main__`` and Django's numbered migration files are not modules anyone imports.
    """
    found: dict[str, Path] = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        if any(part.startswith("_") or part[0].isdigit() for part in parts):
            continue
        found[".".join(parts)] = path
    return found


EVERY_PUBLIC_MODULE = every_public_module()


def source_file(module: str) -> Path:
    path = ROOT.parent.joinpath(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def public_names(tree: ast.Module) -> list[str]:
    """The module's ``__all__``; without one, its public top-level classes and functions."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            return list(ast.literal_eval(node.value))
    return [
        node.name
        for node in tree.body
        if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and not node.name.startswith("_")
    ]


def static_docstring(module: str, name: str) -> str | None:
    """The docstring of ``module.name`` as the source writes it, imports followed.

    A class's or function's own docstring, a constant's attribute docstring (the string
    after its assignment), or, for a name the module imports from elsewhere in the package
    (at the top or under ``TYPE_CHECKING``), the docstring where it is defined.
    """
    path = source_file(module)
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for i, node in enumerate(tree.body):
        if (
            isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
            and node.name == name
            and ast.get_docstring(node)
        ):
            return ast.get_docstring(node)
        targets = (
            node.targets
            if isinstance(node, ast.Assign)
            else [node.target]
            if isinstance(node, ast.AnnAssign)
            else []
        )
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            after = tree.body[i + 1] if i + 1 < len(tree.body) else None
            if (
                isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                return after.value.value
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom):
            continue
        for alias in node.names:
            if (alias.asname or alias.name) != name:
                continue
            if node.level:
                package = module.split(".")
                if path.name != "__init__.py":
                    package.pop()
                package = package[: len(package) - node.level + 1]
                origin = ".".join([*package, *([node.module] if node.module else [])])
            else:
                origin = node.module or ""
            if origin.split(".")[0] != "dbcancel" or not source_file(origin).is_file():
                return None
            return static_docstring(origin, alias.name)
    return None


@pytest.mark.parametrize("module", sorted(EVERY_PUBLIC_MODULE))
def test_every_public_module_and_name_has_a_docstring(module):
    # All of them, the integrations included: the API reference renders them from their
    # docstrings, and hides a name that has none.
    tree = ast.parse(EVERY_PUBLIC_MODULE[module].read_text(encoding="utf-8"))
    assert (ast.get_docstring(tree) or "").strip(), f"{module} has no docstring"
    undocumented = [
        name for name in public_names(tree) if not (static_docstring(module, name) or "").strip()
    ]
    assert undocumented == [], f"{module}: no docstring for {undocumented}"


def test_the_public_modules_are_found():
    assert {"dbcancel", "dbcancel.contrib.flask", "dbcancel.contrib.django.tasks"} <= set(
        EVERY_PUBLIC_MODULE
    )
    assert not [m for m in EVERY_PUBLIC_MODULE if "._" in m or "migrations.0" in m]


@pytest.mark.parametrize("module", PUBLIC_MODULES)
def test_module_all_names_are_defined_there(module):
    mod = importlib.import_module(f"dbcancel.{module}")
    assert isinstance(getattr(mod, "__all__", None), list | tuple), f"{module} has no __all__"
    assigned = module_assignments(mod)
    aliases = type_aliases(mod)
    for name in mod.__all__:
        assert hasattr(mod, name), f"dbcancel.{module}.__all__ lists missing {name!r}"
        obj = getattr(mod, name)
        if name in aliases:
            # A type alias is defined by its assignment here, whatever class it names.
            assert name in assigned
        elif inspect.isclass(obj) or inspect.isfunction(obj):
            # Or in a private module of the package whose names this one imports
            # lazily (the SQLAlchemy mixin of dbcancel.models).
            home = obj.__module__
            assert home == mod.__name__ or home.startswith("dbcancel._"), (
                f"dbcancel.{module}.__all__ re-exports {name!r} from {obj.__module__}"
            )
        else:
            assert name in assigned, f"{name!r} is not assigned in dbcancel.{module}"


def test_top_level_names_are_the_modules_objects():
    for name in dbcancel.__all__:
        obj = getattr(dbcancel, name)
        homes = [
            m
            for m in PUBLIC_MODULES
            if name in importlib.import_module(f"dbcancel.{m}").__all__
            and getattr(importlib.import_module(f"dbcancel.{m}"), name) is obj
        ]
        assert homes, f"dbcancel.{name} is not exported by any public module"


def test_py_typed_ships():
    marker = importlib.resources.files("dbcancel").joinpath("py.typed")
    assert marker.is_file()
    # An editable install reads the source tree, so also check the packaging metadata
    # that puts the marker into wheels and sdists.
    setup_cfg = ROOT.parent / "setup.cfg"
    if setup_cfg.is_file():
        cfg = configparser.ConfigParser()
        cfg.read(setup_cfg, encoding="utf-8")
        assert "py.typed" in cfg.get("options.package_data", "dbcancel", fallback="")


def test_core_imports_no_optional_package():
    script = textwrap.dedent(
        f"""
        import json, sys
        import dbcancel
        for name in {PUBLIC_MODULES!r}:
            __import__("dbcancel." + name)
        print(json.dumps(sorted(sys.modules)))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    loaded = json.loads(out)
    assert "dbcancel" in loaded
    heavy = sorted(
        m
        for m in loaded
        if m.split(".")[0] in OPTIONAL_PACKAGES or m.startswith("dbcancel.contrib")
    )
    assert heavy == [], f"importing the core pulled in optional packages: {heavy}"


def test_optional_packages_are_importable_here():
    """Guards the test above: the packages it looks for are importable in this venv."""
    probe = [p for p in ("psycopg", "pymysql") if importlib.util.find_spec(p) is not None]
    assert probe, "the dev environment should have psycopg and PyMySQL installed"
