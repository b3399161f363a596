"""The ClientApp side of the bridge: a node holds one client of the scenario (its `partition-id`), builds the
scenario's data, model, rule and uplink codec once per process, and answers each train message by running the
client's job with `fedsim.runtime.local.run_client` (the function the sequential runtime runs) from the received
start. The client's persistent state and its codec state (error-feedback residuals) stay on the node, in
`context.state`; only the encoded payload travels back."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedsim.codecs import build_codec
from fedsim.errors import FedsimError
from fedsim.flower.build import ScenarioSource, built
from fedsim.flower.records import get_tree, put_tree
from fedsim.oracle import AutogradOracle, local_oracle
from fedsim.params import Pytree
from fedsim.personal import personal_test_sums
from fedsim.runtime import Job
from fedsim.runtime.base import torch_threads
from fedsim.runtime.context import RuntimeContext, client_tensors, job_seeds
from fedsim.runtime.local import job_batches, job_info, job_keys, kept_state, run_client
from fedsim.seeding import Stream
from fedsim.simulation import Simulation

CLIENT_STATE, CODEC_STATE, NODE_ROW = "fedsim.client_state", "fedsim.codec_state", "fedsim.node_row"
"""Where a node keeps its client's state, its uplink codec state and (relayed gossip) its model in `context.state`."""
START, JOB, PAYLOAD, RESULT, NODE, ERROR, MIX, ROW, PERSONAL = ("start", "job", "payload", "result", "node", "error",
                                                           "mix", "row", "personal")
"""Names of the records in the bridge's messages."""
BROADCAST = "broadcast"
"""A job's start as the downlink codec's payload, which the node decodes (in place of `start`)."""
HEARD, SENT = "heard", "fedsim.payloads_sent"
"""How many of the client's payloads the server has decoded (train messages), and sent (the node's context)."""


def neighbour_key(node: int) -> str:
    """The record holding neighbour `node`'s model in a relayed gossip step."""
    return f"from.{node}"


class NodeConfigError(FedsimError):
    """A node's `--node-config` does not say which client it holds, or names one the scenario does not have."""


def node_simulation(scenario: ScenarioSource, context: Context) -> Simulation:
    """What this node builds from the scenario: with `data-dir` in its node config, the data set's files are read
    from that directory (the device's own copy) instead of the scenario's `data.root`."""
    data_dir = context.node_config.get("data-dir")
    if data_dir is None:
        return built(scenario)
    if not isinstance(data_dir, str) or not data_dir:
        raise NodeConfigError(f"node_config.data-dir: expected a directory path, got {data_dir!r}")
    try:
        return built(scenario, {"data.root": data_dir})
    except FedsimError as exc:
        raise NodeConfigError(f"node_config.data-dir: {data_dir!r}: {exc}") from None


def partition_id(node_config: Mapping[str, Any], num_clients: int) -> int:
    """The client a node holds: its `partition-id`, checked against the scenario's clients (and `num-partitions`,
    when the node gives one)."""
    value = node_config.get("partition-id")
    last = num_clients - 1
    if value is None:
        raise NodeConfigError(f'node_config.partition-id: missing; start the node with --node-config '
                              f'"partition-id=K" (K in 0..{last})')
    if isinstance(value, bool) or not isinstance(value, int):
        raise NodeConfigError(f"node_config.partition-id: expected an integer in 0..{last}, got {value!r}")
    if not 0 <= value <= last:
        raise NodeConfigError(f"node_config.partition-id: {value} is out of range; the scenario has {num_clients} "
                              f"clients (0..{last})")
    parts = node_config.get("num-partitions")
    if parts is not None and parts != num_clients:
        raise NodeConfigError(f"node_config.num-partitions: {parts!r}, but the scenario has {num_clients} clients")
    return value


def job_record(job: Job) -> ConfigRecord:
    """A job's facts as the train message carries them."""
    return ConfigRecord({"id": job.id, "client": job.client, "steps": job.steps, "version": job.version})


def record_job(record: Mapping[str, Any]) -> Job:
    """The job a train message's `job` record describes."""
    return Job(int(record["id"]), int(record["client"]), int(record["steps"]), int(record["version"]))


def run_job(sim: Simulation, job: Job, start: Pytree, client_state: Pytree | None,
            codec_state: Pytree | None) -> tuple[Pytree, Pytree | None, Pytree | None, int, int]:
    """One job as the sequential runtime runs it, up to the uplink codec's encode: (payload, client state, codec
    state, training samples, work)."""
    rule, seed = sim.rule, sim.scenario.spec.seed
    uplink = build_codec(sim.scenario.spec.compression.uplink, "compression.uplink")
    x, y = client_tensors(RuntimeContext(rule, sim.objective, sim.data, seed), job.client, torch.device("cpu"))
    key, codec_key = job_keys(seed, [job])[0], job_keys(seed, [job], Stream.CODEC)[0]
    batches = job_batches(x, y, rule.hp, job.steps, job_seeds(seed, Stream.LOCAL, [job])[0], key)
    state = rule.initial_state(start) if client_state is None else client_state
    message, new_state, processed = run_client(rule, local_oracle(sim.objective, rule.hp), start, state,
                                               job_info(len(y), job.steps, job.client), batches)
    first = codec_state is None
    payload, new_codec = uplink.encode(message, uplink.init(message) if first else codec_state, codec_key,
                                       first=first)
    return payload, new_state, kept_state(new_codec), len(y), processed * rule.step_cost


def decoded_broadcast(sim: Simulation, payload: Pytree) -> Pytree:
    """The server's broadcast rebuilt from its downlink payload (downlink codecs on Flower keep nothing on the
    receiving side, `fedsim.flower.server` checks, so the node needs no mirror of past broadcasts)."""
    downlink = build_codec(sim.scenario.spec.compression.downlink, "compression.downlink")
    template = sim.server.broadcast(sim.server.init(sim.model.init_params))
    return downlink.decode(payload, template, downlink.shared(downlink.init(template)))[0]


def synced_codec_state(content: RecordDict, context: Context) -> tuple[Pytree | None, bool]:
    """The node's uplink codec state, and whether it starts afresh: when the server decoded fewer payloads than the
    node sent (a reply was lost), the server's mirror no longer matches, so both sides start the codec over."""
    state = get_tree(context.state, CODEC_STATE)
    sent = context.state[SENT]["payloads"] if SENT in context.state else 0
    if state is not None and sent != int(content.config_records[HEARD]["payloads"]):
        return None, True
    return state, False


def train(scenario: ScenarioSource, content: RecordDict, context: Context) -> RecordDict:
    """A train message's reply: the job's encoded payload and facts; the node's states are updated in place."""
    sim = node_simulation(scenario, context)
    client = partition_id(context.node_config, sim.scenario.spec.num_clients)
    job = record_job(content.config_records[JOB])
    if job.client != client:
        raise NodeConfigError(f"node_config.partition-id: this node holds client {client}, but was sent a job of "
                              f"client {job.client}")
    relayed = START not in content and BROADCAST not in content  # a gossip node: it starts from the model it holds
    if relayed:
        start = {"params": node_row(sim, context)}
    else:
        start = get_tree(content, START) if START in content else decoded_broadcast(sim, get_tree(content, BROADCAST))
    codec_state, restarted = synced_codec_state(content, context)
    payload, new_state, new_codec, samples, work = run_job(sim, job, start, get_tree(context.state, CLIENT_STATE),
                                                           codec_state)
    put_tree(context.state, CLIENT_STATE, new_state)
    put_tree(context.state, CODEC_STATE, new_codec)
    context.state[SENT] = ConfigRecord({"payloads": int(content.config_records[HEARD]["payloads"]) + 1})
    if relayed:  # gossip protocols have no uplink path, so the payload is the message itself
        delta = payload["delta"]
        put_tree(context.state, NODE_ROW, {k: torch.add(v, delta[k].to(v.dtype)) for k, v in start["params"].items()})
    time.sleep(train_delay(context.node_config))
    reply = RecordDict({RESULT: ConfigRecord({"id": job.id, "client": job.client, "num_samples": samples,
                                              "work": work, "codec_restarted": restarted})})
    put_tree(reply, PAYLOAD, payload)
    return reply


def train_delay(node_config: Mapping[str, Any]) -> float:
    """Node config `train-delay`: seconds a node waits after each job before replying (0 by default), to make
    devices of different speeds out of equal machines, as asynchronous protocols need to be tried."""
    value = node_config.get("train-delay", 0.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
        raise NodeConfigError(f"node_config.train-delay: expected seconds >= 0, got {value!r}")
    return float(value)


def node_row(sim: Simulation, context: Context) -> Pytree:
    """The model a relayed gossip node holds: the scenario's initial model until its first step."""
    row = get_tree(context.state, NODE_ROW)
    return sim.model.init_params if row is None else row


def mix(scenario: ScenarioSource, content: RecordDict, context: Context) -> RecordDict:
    """A relayed gossip step: this node's model becomes sum_j W_ij x_j over itself and the neighbours' models the
    message brings (W's row in the order of its columns, as the in-process sparse product sums it)."""
    sim = node_simulation(scenario, context)
    node = partition_id(context.node_config, sim.scenario.spec.num_clients)
    facts = content.config_records[MIX]
    if int(facts["node"]) != node:
        raise NodeConfigError(f"node_config.partition-id: this node is gossip node {node}, but was sent node "
                              f"{facts['node']}'s gossip step")
    own = node_row(sim, context)
    rows = [own if j == node else get_tree(content, neighbour_key(j)) for j in facts["columns"]]
    weights = torch.tensor(list(facts["weights"]), dtype=torch.float64)
    mixed = {k: torch.tensordot(weights.to(v.dtype), torch.stack([r[k] for r in rows]), dims=1)
             for k, v in own.items()}
    put_tree(context.state, NODE_ROW, mixed)
    reply = RecordDict({MIX: ConfigRecord({"node": node})})
    put_tree(reply, ROW, mixed)
    return reply


def personal(scenario: ScenarioSource, content: RecordDict, context: Context) -> RecordDict:
    """This node's client's personal model scored on its test split (`fedsim.personal`): the task's sums, or
    `scored: False` when the rule keeps personal state and this client has none yet."""
    sim = node_simulation(scenario, context)
    client = partition_id(context.node_config, sim.scenario.spec.num_clients)
    message, state = get_tree(content, START), get_tree(context.state, CLIENT_STATE)
    if state is None and sim.rule.initial_state(message) is not None:
        return RecordDict({PERSONAL: ConfigRecord({"client": client, "scored": False})})
    sums = personal_test_sums(sim.rule, sim.objective, sim.data, client, state, message, AutogradOracle(sim.objective))
    return RecordDict({PERSONAL: ConfigRecord({"client": client, "scored": True,
                                               **{k: float(v) for k, v in sums.items()}})})


def answered(work: Callable[[], RecordDict]) -> RecordDict:
    """The reply `work` makes, or an `error` record with the one-line message of a user's mistake (so the server
    reports it as such, whichever transport carried it)."""
    try:
        return work()
    except FedsimError as exc:
        return RecordDict({ERROR: ConfigRecord({"kind": type(exc).__name__, "line": str(exc)})})


def in_scenario_threads(scenario: ScenarioSource, context: Context,
                        work: Callable[[ScenarioSource, RecordDict, Context], RecordDict],
                        content: RecordDict) -> RecordDict:
    """work(scenario, content, context) with torch's intra-op threads set to the scenario's runtime threads, as an
    in-process run sets them: reductions split over another number of threads round differently, and a node's
    numbers must be the in-process run's."""
    with torch_threads(node_simulation(scenario, context).scenario.components["runtime"].params.threads):
        return work(scenario, content, context)


def client_app(scenario: ScenarioSource) -> ClientApp:
    """The ClientApp of a scenario: `query` tells the server which client this node holds, `train` runs a job,
    `train.mix` takes a relayed gossip step, `evaluate` scores the client's personal model."""
    app = ClientApp()

    @app.query()
    def query(message: Message, context: Context) -> Message:
        def answer() -> RecordDict:
            client = partition_id(context.node_config, node_simulation(scenario, context).scenario.spec.num_clients)
            return RecordDict({NODE: ConfigRecord({"partition-id": client})})
        return Message(answered(answer), reply_to=message)

    @app.train()
    def train_message(message: Message, context: Context) -> Message:
        return Message(answered(lambda: in_scenario_threads(scenario, context, train, message.content)),
                       reply_to=message)

    @app.evaluate()
    def evaluate_message(message: Message, context: Context) -> Message:
        return Message(answered(lambda: in_scenario_threads(scenario, context, personal, message.content)),
                       reply_to=message)

    @app.train(MIX)
    def mix_message(message: Message, context: Context) -> Message:
        return Message(answered(lambda: in_scenario_threads(scenario, context, mix, message.content)),
                       reply_to=message)

    return app
