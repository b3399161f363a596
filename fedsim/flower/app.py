"""`fedsim flower-app SCENARIO --out APP_DIR`: a Flower app directory for one scenario variant, which `flwr run`
deploys (to a SuperLink and its SuperNodes, or to Flower's simulation engine). It holds the resolved scenario,
two small modules that build the ServerApp and ClientApp from it with fedsim's factories, and a pyproject.toml
whose [tool.flwr.app] names them; nodes say which client they hold with `--node-config "partition-id=K"`."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedsim.errors import UsageError
from fedsim.flower.build import resolve_one
from fedsim.outputs import scenario_document, write_atomic
from fedsim.preflight import check_scenario
from fedsim.strict_input import dump_yaml

PACKAGE = "fedsim_app"
SCENARIO_FILE = "scenario.yaml"

PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{project}"
version = "1.0.0"
description = "fedsim scenario {name!r} ({variant}) as a Flower app, written by fedsim flower-app"
license = "Apache-2.0"
dependencies = ["flwr>=1.42,<1.43", "fedsim-lab"]

[tool.hatch.build.targets.wheel]
packages = ["{package}"]

[tool.flwr.app]
publisher = "fedsim"

[tool.flwr.app.components]
serverapp = "{package}.server_app:app"
clientapp = "{package}.client_app:app"

[tool.flwr.app.config]
# seconds the ServerApp waits for each round's replies, and for every client's node to connect
timeout = 600.0
connect_timeout = 600.0
# a directory on the ServerApp's machine for metrics.jsonl ("" writes none; the rows are logged either way)
out = ""
"""

MODULE = '''"""The {side} of fedsim scenario {name!r}, built by fedsim from {scenario} (by fedsim flower-app)."""

from pathlib import Path

from fedsim.flower.{module} import {factory}

app = {factory}(Path(__file__).resolve().parent.parent / "{scenario}")
'''


def write_app(source: str | Path | Mapping[str, Any], out: str | Path, overrides: Mapping[str, Any] | None = None,
              variant: str | None = None, overwrite: bool = False) -> Path:
    """Write the app directory for the scenario's one variant (or `variant`) into `out`; returns its path."""
    scenario = resolve_one(source, overrides, variant)
    check_scenario(scenario)
    root = Path(out)
    if root.exists() and (not root.is_dir() or (any(root.iterdir()) and not overwrite)):
        raise UsageError(f"--out: {root} exists and is not an empty directory (--overwrite replaces its files)")
    spec = scenario.spec
    project = "fedsim-" + (re.sub(r"[^a-z0-9]+", "-", spec.name.lower()).strip("-") or "app")
    files = {
        "pyproject.toml": PYPROJECT.format(project=project, name=spec.name, variant=scenario.variant,
                                           package=PACKAGE),
        SCENARIO_FILE: dump_yaml(scenario_document([scenario.to_dict()], [scenario.variant])),
        f"{PACKAGE}/__init__.py": '"""A fedsim scenario as a Flower app."""\n',
        f"{PACKAGE}/server_app.py": MODULE.format(side="ServerApp", name=spec.name, scenario=SCENARIO_FILE,
                                                  module="server", factory="server_app"),
        f"{PACKAGE}/client_app.py": MODULE.format(side="ClientApp", name=spec.name, scenario=SCENARIO_FILE,
                                                  module="client", factory="client_app"),
    }
    (root / PACKAGE).mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        write_atomic(root / name, text)
    return root
