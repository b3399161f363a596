"""The design card's layout: clients/, servers/, topologies/ import as fedsim.clients, .servers, .topologies."""

from __future__ import annotations

from pathlib import Path

import fedsim.clients
import fedsim.servers
import fedsim.topologies


def test_plugin_folders_import_under_the_fedsim_namespace():
    for module, folder in [(fedsim.clients, "clients"), (fedsim.servers, "servers"),
                           (fedsim.topologies, "topologies")]:
        assert Path(module.__file__).parent.name == folder


def test_python_api_returns_a_metrics_table(tiny):
    result = fedsim.run(tiny, overrides={"seed": 3}, write=False)
    assert result.scenarios[0].spec.seed == 3
    assert {"round", "sim_time", "accuracy", "loss", "bytes_up", "bytes_down"} <= set(result.metrics.columns)
    assert len(result.metrics.where(variant="tiny")) == 4
    assert "accuracy" in repr(result.metrics)
