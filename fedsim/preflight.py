"""Checks that a resolved scenario can run here before anything is built: the memory its clients, data and model
need (sized from parameters and file headers, never by allocating), and the places it will write.

`fedsim run` calls these before any work and `fedsim check` calls nothing else, so a sweep can be linted on a login
node: a scenario `check` accepts fails later only for what needs its data built (a partition that cannot be made,
a client left without training samples) or its training run (divergence).
"""

from __future__ import annotations

from typing import Any

import torch

from fedsim.data.base import Footprint
from fedsim.errors import ScenarioError
from fedsim.outputs import check_output_location
from fedsim.resources import check_fits
from fedsim.runtime.placement import resolve_devices
from fedsim.scenario import Component, ResolvedScenario, naming_variant
from fedsim.strict_input import shorten

PER_CLIENT_BYTES = 256
"""Bookkeeping every client costs whether or not it holds data (sizes, offsets, speeds, sampling); the data check
adds 16 bytes a client and class for label-skew partitioners."""
MODEL_COPIES = 16
"""Copies of the parameters a run holds at once beyond the clients in flight (initial and global model, server
optimizer state, per-device copies, aggregation sums, a client's step state and gradients)."""


def _fields(params: Any) -> str:
    return ", ".join(f"{k}={shorten(v)}" for k, v in params.model_dump().items())


def data_footprint(scenario: ResolvedScenario) -> Footprint | None:
    """What the scenario's data set will take to build and what shape it gives (None if it does not say)."""
    data = scenario.components["data"]
    footprint = data.entry.meta.get("footprint")
    return None if footprint is None else footprint(data.params, scenario.spec.num_clients)


def model_parameters(model: Component, feature_shape: tuple[int, ...], num_classes: int) -> int:
    """Number of parameters of the model, counted on torch's meta device (shapes only, nothing allocated)."""
    try:
        with torch.device("meta"):
            module = model.entry.obj(model.params, feature_shape, num_classes)
        return sum(p.numel() for p in module.parameters())
    except (RuntimeError, OverflowError, ValueError):
        raise ScenarioError(f"model: too large: {model.name} ({_fields(model.params)}) has more parameters than "
                            f"can be counted") from None


def check_memory(scenario: ResolvedScenario) -> None:
    """Refuse a scenario whose client bookkeeping, data set or model cannot fit in this process's memory."""
    spec, c = scenario.spec, scenario.components
    check_fits("num_clients", spec.num_clients * PER_CLIENT_BYTES, f"keeping track of {spec.num_clients} clients")
    footprint = data_footprint(scenario)
    if footprint is None:
        return
    data = c["data"]
    fields = ", ".join(filter(None, [f"num_clients={spec.num_clients}", _fields(data.params)]))
    label_counts = 16 * spec.num_clients * footprint.num_classes
    check_fits("data", footprint.nbytes + label_counts, f"building {data.name} ({fields})")
    count = model_parameters(c["model"], footprint.feature_shape, footprint.num_classes)
    check_fits("model", 4 * count * MODEL_COPIES,
               f"{c['model'].name} ({_fields(c['model'].params)}) on inputs {footprint.feature_shape} "
               f"({count} parameters)")


def check_runtime(scenario: ResolvedScenario) -> None:
    """The devices a runtime names must exist here, and the places it writes besides the run directory (the spill
    directory of client states) must be writable."""
    runtime = scenario.components["runtime"].params
    if hasattr(runtime, "devices"):
        resolve_devices(runtime.devices)
    if getattr(runtime, "state_memory", None) is not None and runtime.spill_dir is not None:
        check_output_location(runtime.spill_dir, "runtime.spill_dir")


def check_scenario(scenario: ResolvedScenario) -> None:
    """Everything knowable about a scenario without building it, with the variant named in any error."""
    with naming_variant(scenario.declared_name):
        check_memory(scenario)
        check_runtime(scenario)
