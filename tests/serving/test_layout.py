"""The serving package's fence: the production client (serving, serving.client, .codec,
.errors, .scoring) never imports the development stand-in (serving.devserver), and the
package exports only the client's API."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.serving.conftest import REPO

SERVING = REPO / "serving"
CLIENT_MODULES = ["serving", "serving.client", "serving.codec", "serving.errors", "serving.scoring",
                  "serving.config_protos"]


def test_importing_the_client_loads_nothing_of_the_stand_in():
    code = ("import sys, importlib\n"
            f"for name in {CLIENT_MODULES!r}: importlib.import_module(name)\n"
            "print(sorted(m for m in sys.modules if m == 'serving' or m.startswith('serving.')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert out.returncode == 0, out.stderr[-2000:]
    loaded = eval(out.stdout.strip().splitlines()[-1])  # noqa: S307 - our own print of a list of names
    assert loaded == sorted(CLIENT_MODULES), loaded


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_nothing_outside_the_fence_names_the_stand_in():
    outside = {p.name: _imports(p) for p in SERVING.glob("*.py")}
    offenders = {name: sorted(i for i in imports if "devserver" in i) for name, imports in outside.items()}
    assert not any(offenders.values()), offenders
    for path in (SERVING / "devserver").glob("*.py"):  # nor does the stand-in lean on the client
        assert not {i for i in _imports(path) if i.lstrip(".") in ("client", "codec", "scoring")
                    or i.startswith("serving.")}, path.name


def test_the_package_exports_the_client_api_only():
    import serving

    assert sorted(serving.__all__) == ["ModelInfo", "ModelInfoUnavailable", "ServingClient", "ServingError"]
    assert all(getattr(serving, name).__module__ in ("serving.client", "serving.errors") for name in serving.__all__)
