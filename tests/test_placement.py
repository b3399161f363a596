"""Device placement: which devices a runtime uses, the policies that spread jobs, and workers per device."""

from __future__ import annotations

import math

import pytest
import torch

import fedsim
from fedsim.errors import ScenarioError
from fedsim.runtime import Job
from fedsim.runtime.placement import Placement, PlacementParams, resolve_devices

CPU = torch.device("cpu")


def jobs(*clients: int) -> list[Job]:
    return [Job(0, c, 1) for c in clients]


def test_auto_picks_what_exists():
    expected = [torch.device("cuda", i) for i in range(torch.cuda.device_count())] or [CPU]
    assert resolve_devices("auto") == expected


def test_unknown_and_absent_devices_are_errors_naming_the_setting():
    with pytest.raises(ScenarioError, match=r"^runtime.devices: 'tpu:0' is not"):
        resolve_devices(["tpu:0"])
    absent = f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(ScenarioError, match=rf"^runtime.devices: {absent} does not exist here"):
        resolve_devices(["cpu", absent])


def test_round_robin_spreads_jobs_in_turn():
    placement = Placement([CPU, CPU, CPU], PlacementParams())
    assert placement.split(jobs(9, 4, 7, 1, 0)) == [[0, 3], [1, 4], [2]]


def test_by_client_keeps_a_client_on_one_device():
    placement = Placement([CPU, CPU], PlacementParams(policy="by_client"))
    assert placement.split(jobs(9, 4, 7, 2)) == [[1, 3], [0, 2]]


def test_explicit_map_places_mapped_clients_and_spreads_the_rest():
    placement = Placement([CPU], PlacementParams(policy="map", map={5: "cpu"}))
    assert placement.split(jobs(5, 1)) == [[0, 1]]
    with pytest.raises(ScenarioError, match=r"^runtime.placement.map: client 5 is mapped to cuda:7"):
        Placement([CPU], PlacementParams(policy="map", map={5: "cuda:7"}))
    with pytest.raises(ScenarioError, match="needs a client -> device map"):
        Placement([CPU], PlacementParams(policy="map"))


def test_outputs_come_back_in_job_order_from_concurrent_workers():
    placement = Placement([CPU, CPU, CPU], PlacementParams(policy="by_client"))
    out = placement.run(jobs(3, 1, 2, 0, 5), lambda slot, positions: [(slot, p) for p in positions])
    assert [p for _, p in out] == [0, 1, 2, 3, 4]
    assert [slot for slot, _ in out] == [0, 1, 2, 0, 2]


@pytest.mark.parametrize("runtime", ["sequential", "vectorized"])
@pytest.mark.parametrize("policy", ["round_robin", "by_client"])
def test_two_workers_give_the_one_worker_numbers(tiny, runtime, policy):
    tiny["stragglers"] = {"fraction": 0.5}
    one = fedsim.run({**tiny, "runtime": {"name": runtime}}, write=False)
    two = fedsim.run({**tiny, "runtime": {"name": runtime, "devices": ["cpu", "cpu"],
                                          "placement": {"policy": policy}}}, write=False)
    for a, b in zip(one.metrics.rows, two.metrics.rows, strict=True):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-9) and a["accuracy"] == b["accuracy"]


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
@pytest.mark.parametrize("runtime", ["sequential", "vectorized"])
def test_cuda_gives_the_cpu_numbers(tiny, runtime):
    cpu = fedsim.run({**tiny, "runtime": {"name": runtime}}, write=False)
    gpu = fedsim.run({**tiny, "runtime": {"name": runtime, "devices": ["cuda:0"]}}, write=False)
    for a, b in zip(cpu.metrics.rows, gpu.metrics.rows, strict=True):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-4)


@needs_cuda
def test_cpu_and_cuda_workers_together_give_the_cpu_numbers(tiny):
    cpu = fedsim.run({**tiny, "runtime": {"name": "vectorized"}}, write=False)
    mixed = fedsim.run({**tiny, "runtime": {"name": "vectorized", "devices": ["cpu", "cuda:0"]}}, write=False)
    for a, b in zip(cpu.metrics.rows, mixed.metrics.rows, strict=True):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-4)
