"""Load the example programs under ``examples/`` as modules, by path.

``examples/`` is not a package (the files are programs a user copies), so tests that need
their classes, such as the analysis server, import them from here.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SERVER_PATH = EXAMPLES / "analysis_server.py"


def load_example(path: Path) -> ModuleType:
    """Import the example at ``path`` once per test session; later calls return it again."""
    name = f"dbcancel_examples_{path.stem}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # Registered before it runs: dataclasses and pickling look the module up by name.
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
