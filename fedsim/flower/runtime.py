"""`FlowerRuntime`: a fedsim runtime whose jobs run on Flower nodes. Inside a ServerApp, fedsim's own protocol
(sampling, server rule, aggregate, evaluation, virtual clock) calls `run_jobs`; each job becomes one train
Message to the node holding the job's client (learned once by asking every node for its `partition-id`), with
the job's start and facts, and each reply's encoded payload is decoded into the result the protocol aggregates.
Client state stays on the nodes (results carry none); bytes are the payload data the reply carried. A node whose
reply does not come within the timeout is taken as gone: its job is lost (the protocol goes on with the results it
has), later jobs of its client are lost without waiting, and `take_lost` says which."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from fedsim.clients import ClientRule
from fedsim.codecs import Codec
from fedsim.errors import FedsimError
from fedsim.evaluation import Sums
from fedsim.flower.client import (
    BROADCAST,
    ERROR,
    HEARD,
    JOB,
    NODE,
    PAYLOAD,
    PERSONAL,
    RESULT,
    START,
    NodeConfigError,
    job_record,
)
from fedsim.flower.records import data_bytes, get_tree, put_tree
from fedsim.params import Pytree, tree_leaves
from fedsim.runtime import InProcess, Job, JobResult, Starts, jobs_starts
from fedsim.runtime.local import message_template

POLL_SECONDS = 0.5
"""How often the server looks for nodes that have not connected yet."""
PULL_SECONDS = 0.02
"""How often an asynchronous run pulls replies while none has come."""


KEPT_BROADCASTS = 64
"""Broadcasts whose payloads the runtime keeps for jobs still to start from them (older ones go decoded)."""


class FlowerError(FedsimError):
    """The Flower side failed: nodes missing after the timeout, or a node's ClientApp raised."""


class FlowerRuntime(InProcess):
    """Runs jobs on Flower nodes through a Grid: one node per client, found by its `partition-id`."""

    threads = 1

    def __init__(self, grid: Grid, rule: ClientRule, uplink: Codec, num_clients: int, timeout: float,
                 starts_on_nodes: bool = False, connect_timeout: float | None = None) -> None:
        self.grid, self.rule, self.uplink = grid, rule, uplink
        self.num_clients, self.timeout = num_clients, timeout
        self.connect_timeout = timeout if connect_timeout is None else connect_timeout
        """Seconds to wait for every client's node to connect and say which client it holds (the first answer of
        a node starts its ClientApp, which can take longer than a round's replies)."""
        self.starts_on_nodes = starts_on_nodes
        """Relayed gossip: each node starts from the model it holds (jobs carry no start), and a lost job ends the
        run, since that model lives only on its node."""
        self.nodes: dict[int, int] = {}
        """client -> node id"""
        self.gone: set[int] = set()
        """Nodes that missed a reply deadline."""
        self.lost: list[dict[str, int]] = []
        """Jobs lost since `take_lost` was last called: round (job id), client and node."""
        self.submitted: dict[str, tuple[Job, Pytree]] = {}
        """Asynchronous jobs pushed and not yet answered, by message id, with their starts."""
        self.arrived: dict[int, JobResult] = {}
        """Asynchronous results pulled and not yet taken, by job id, in arrival order."""
        self.announced: set[int] = set()
        """Job ids `wait_arrival` has returned."""
        self.mirrors: dict[int, Pytree] = {}
        """Per client, the server's mirror of its uplink codec's shared state (EF21's h_i), kept from its payloads."""
        self.heard: dict[int, int] = {}
        """Per client, how many of its payloads the server has decoded (what the node compares with what it sent)."""
        self.broadcasts: OrderedDict[int, tuple[Pytree, Pytree]] = OrderedDict()
        """The latest broadcasts the protocol encoded, by the decoded message's id: (message, payload); a job
        starting from one of them carries the payload, which its node decodes."""

    def broadcast_payload(self, message: Pytree, payload: Pytree) -> None:
        """Send `payload` wherever a job starts from `message` (the latest `KEPT_BROADCASTS` of them)."""
        self.broadcasts[id(message)] = message, payload
        while len(self.broadcasts) > KEPT_BROADCASTS:
            self.broadcasts.popitem(last=False)

    def put_start(self, content: RecordDict, start: Pytree) -> None:
        """A job's start into its train message: the downlink payload it was decoded from, when known."""
        sent = self.broadcasts.get(id(start))
        if sent is not None and sent[0] is start:
            put_tree(content, BROADCAST, sent[1])
        else:
            put_tree(content, START, start)

    def run_jobs(self, jobs: Sequence[Job], starts: Starts) -> list[JobResult]:
        if not self.nodes:
            self.nodes = self.discover()
        per_job = jobs_starts(jobs, starts)
        messages = []
        for job, start in zip(jobs, per_job, strict=True):
            if self.nodes[job.client] in self.gone:
                continue
            content = self.train_content(job, start)
            messages.append(Message(content, self.nodes[job.client], "train", group_id=str(job.id)))
        replies: dict[tuple[int, int], RecordDict] = {}
        for _, content in self.answers(messages):
            facts = content.config_records[RESULT]
            replies[int(facts["id"]), int(facts["client"])] = content
        results = []
        for job, start in zip(jobs, per_job, strict=True):
            content = replies.get((job.id, job.client))
            if content is None:
                node = self.nodes[job.client]
                if self.starts_on_nodes:
                    raise FlowerError(f"nodes: gossip node {job.client} (Flower node {node}) did not answer its "
                                      f"local steps within {self.timeout:g} s; a relayed gossip run cannot go on "
                                      f"without it")
                self.gone.add(node)
                self.lost.append({"round": job.id, "client": job.client, "node": node})
                continue
            results.append(self.decoded(job, start, content))
        return results

    def train_content(self, job: Job, start: Pytree) -> RecordDict:
        """A train message's content: the job, how many of its client's payloads the server has decoded (a node
        whose count differs lost a reply, so it starts its codec afresh), and its start (none for relayed gossip)."""
        content = RecordDict({JOB: job_record(job), HEARD: ConfigRecord({"payloads": self.heard.get(job.client, 0)})})
        if not self.starts_on_nodes:
            self.put_start(content, start)
        return content

    def decoded(self, job: Job, start: Pytree, content: RecordDict) -> JobResult:
        """A reply's result, its payload decoded against the message template of the job's start, with the server's
        mirror of the client's codec state (a fresh one when the node started its codec afresh)."""
        facts = content.config_records[RESULT]
        template = message_template(self.rule, start)
        mirror = None if facts.get("codec_restarted", False) else self.mirrors.get(job.client)
        if mirror is None:
            mirror = self.uplink.shared(self.uplink.init(template))
        message, mirror = self.uplink.decode(get_tree(content, PAYLOAD), template, mirror)
        self.heard[job.client] = self.heard.get(job.client, 0) + 1
        if any(True for _ in tree_leaves(mirror)):
            self.mirrors[job.client] = mirror
        return JobResult(job, message, int(facts["num_samples"]), int(facts["work"]),
                         data_bytes(content.array_records[PAYLOAD]))

    def submit(self, job: Job, start: Pytree) -> None:
        """Push one job to its client's node now, without waiting (asynchronous protocols: `fedsim.async_jobs`)."""
        if not self.nodes:
            self.nodes = self.discover()
        message = Message(self.train_content(job, start), self.nodes[job.client], "train", group_id=str(job.id))
        (message_id,) = self.grid.push_messages([message])
        self.submitted[message_id] = (job, start)

    def wait_arrival(self, timeout: float | None) -> int | None:
        """The id of the next submitted job whose result arrived (up to `timeout` seconds; None then)."""
        if not self._pull_until(lambda: bool(self.arrived.keys() - self.announced), timeout):
            return None
        job_id = next(j for j in self.arrived if j not in self.announced)
        self.announced.add(job_id)
        return job_id

    def take(self, job: Job) -> JobResult:
        """The result of a submitted job, waiting for it if it has not arrived yet."""
        self._pull_until(lambda: job.id in self.arrived, None)
        self.announced.discard(job.id)
        return self.arrived.pop(job.id)

    def _pull_until(self, ready: Callable[[], bool], timeout: float | None) -> bool:
        """Pull replies until `ready()`; False after `timeout` seconds, or, with no timeout, after the run's
        `timeout` an error naming the nodes still working."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while not ready():
            for reply in self.grid.pull_messages(list(self.submitted)):
                job, start = self.submitted.pop(reply.metadata.reply_to_message_id)
                if reply.has_error() and reply.error.code == ErrorCode.NODE_UNAVAILABLE:
                    raise FlowerError(f"nodes: node {self.nodes[job.client]} (client {job.client}) became "
                                      f"unavailable with job {job.id} in flight")
                self.arrived[job.id] = self.decoded(job, start, checked(reply))
            if ready():
                break
            if time.monotonic() > deadline:
                if timeout is not None:
                    return False
                waiting = sorted({self.nodes[job.client] for job, _ in self.submitted.values()})
                raise FlowerError(f"nodes: no result arrived within {self.timeout:g} s from node(s) "
                                  f"{shorten(waiting)}; an asynchronous run cannot tell which job to give up")
            time.sleep(PULL_SECONDS)
        return True

    def discover(self) -> dict[int, int]:
        """Ask every node which client it holds, until every client has a node (or the timeout passes)."""
        nodes: dict[int, int] = {}
        asked: set[int] = set()
        deadline = time.monotonic() + self.connect_timeout
        while len(nodes) < self.num_clients:
            new = [n for n in self.grid.get_node_ids() if n not in asked]
            asked.update(new)
            queries = [Message(RecordDict(), n, "query") for n in new]
            for reply, content in self.answers(queries, self.connect_timeout):
                client = int(content.config_records[NODE]["partition-id"])
                node = reply.metadata.src_node_id
                if client in nodes:
                    raise NodeConfigError(f"node_config.partition-id: nodes {nodes[client]} and {node} both hold "
                                          f"client {client}")
                nodes[client] = node
            if len(nodes) < self.num_clients:
                if time.monotonic() > deadline:
                    missing = sorted(set(range(self.num_clients)) - set(nodes))
                    raise FlowerError(f"nodes: no node holds client(s) {shorten(missing)} after "
                                      f"{self.connect_timeout:g} s "
                                      f"({len(nodes)} of {self.num_clients} clients have a node)")
                time.sleep(POLL_SECONDS)
        return nodes

    def personal_scores(self, server_message: Pytree, stateful: bool,
                        clients: Sequence[tuple[int, int]]) -> Iterator[tuple[int, Sums]]:
        """A `fedsim.personal.Scorer` whose clients' personal models are scored on their nodes, which hold the
        client states (nodes already gone are skipped, and a node silent past the timeout is taken as gone)."""
        if not self.nodes:
            self.nodes = self.discover()
        position = dict((client, i) for i, client in clients)
        messages = []
        for _, client in clients:
            if self.nodes[client] not in self.gone:
                content = RecordDict()
                put_tree(content, START, server_message)
                messages.append(Message(content, self.nodes[client], "evaluate"))
        answered: set[int] = set()
        for _, content in self.answers(messages):
            facts = content.config_records[PERSONAL]
            answered.add(int(facts["client"]))
            if facts["scored"]:
                yield position[int(facts["client"])], {k: torch.tensor(v, dtype=torch.float64) for k, v in
                                                       facts.items() if k not in ("client", "scored")}
        self.gone.update(self.nodes[c] for _, c in clients if c not in answered)

    def answers(self, messages: Sequence[Message], timeout: float | None = None) -> list[tuple[Message, RecordDict]]:
        """Send `messages` and wait for their replies (up to `timeout`, else the run's): each reply with its
        content. A node the SuperLink reports unavailable (it stopped heartbeating) gives no reply, as a node
        silent past the timeout does; a node's error is raised (`checked`)."""
        if not messages:
            return []
        replies = self.grid.send_and_receive(messages, timeout=self.timeout if timeout is None else timeout)
        return [(reply, checked(reply)) for reply in replies
                if not (reply.has_error() and reply.error.code == ErrorCode.NODE_UNAVAILABLE)]

    def take_lost(self) -> list[dict[str, int]]:
        """The jobs lost since the last call (round, client, node), oldest first."""
        lost, self.lost = self.lost, []
        return lost

    def state_dict(self) -> dict[str, Any]:
        """The server's codec mirrors (the nodes keep their own state)."""
        return {"mirrors": {str(client): mirror for client, mirror in self.mirrors.items()},
                "heard": {str(client): count for client, count in self.heard.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mirrors = {int(client): mirror for client, mirror in state["mirrors"].items()}
        self.heard = {int(client): count for client, count in state["heard"].items()}


def checked(reply: Message) -> RecordDict:
    """A reply's content; a node's error (a user's mistake, or its ClientApp failing) as one line."""
    if reply.has_error():
        raise FlowerError(f"node {reply.metadata.src_node_id}: its ClientApp failed: {reply.error.reason}")
    content = reply.content
    if ERROR in content:
        error = content.config_records[ERROR]
        kind = NodeConfigError if error["kind"] == NodeConfigError.__name__ else FlowerError
        raise kind(f"{error['line']} (node {reply.metadata.src_node_id})")
    return content


def shorten(clients: list[int]) -> str:
    return ", ".join(map(str, clients[:10])) + (", ..." if len(clients) > 10 else "")
