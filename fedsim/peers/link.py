"""Gossip links between peer processes over gRPC: each node serves a mailbox its neighbours deliver payloads to
(`Deliver` in `gossip.proto`), and delivers its own to theirs. Deliveries have deadlines and wait for a peer that
is not up yet; a peer that cannot be reached is an error naming it and its address, and collecting from the mailbox
says which senders stayed silent (`fedsim.peers.transport` decides what that means)."""

from __future__ import annotations

import threading
import time
from concurrent import futures
from typing import Any

import grpc

from fedsim.errors import FedsimError
from fedsim.peers import gossip_pb2, gossip_pb2_grpc

MAX_MESSAGE_BYTES = 2**31 - 1
"""gRPC's 4 MB default would refuse model-sized payloads."""
OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES), ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]


class PeerError(FedsimError):
    """A peer cannot be reached, does not answer in time, or refuses this node; the message names the peer."""


class Mailbox(gossip_pb2_grpc.GossipServicer):
    """Payloads delivered to this node, by (round, kind, sender), until taken; only neighbours are accepted."""

    def __init__(self, senders: set[int]) -> None:
        self.senders = senders
        self._items: dict[tuple[int, str, int], bytes] = {}
        self._arrived = threading.Condition()

    def Deliver(self, request: gossip_pb2.Payload, context: Any) -> gossip_pb2.Ack:  # noqa: N802 (gRPC's name)
        if request.sender not in self.senders:
            return gossip_pb2.Ack(accepted=False)
        with self._arrived:
            self._items[(request.round, request.kind, request.sender)] = request.tensors
            self._arrived.notify_all()
        return gossip_pb2.Ack(accepted=True)

    def collect(self, round_index: int, kind: str, senders: list[int], timeout: float) -> dict[int, bytes]:
        """Wait up to `timeout` seconds for every sender's payload of the round; remove and return those that came
        (a sender missing from the result sent nothing in time)."""
        keys = {s: (round_index, kind, s) for s in senders}
        deadline = time.monotonic() + timeout
        with self._arrived:
            while not all(k in self._items for k in keys.values()):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._arrived.wait(left)
            return {s: self._items.pop(k) for s, k in keys.items() if k in self._items}



class PeerNode:
    """This node's end of its gossip links: its mailbox served on `listen` (HOST:PORT; port 0 picks a free one,
    see `address`), and channels to the neighbours given to `connect`."""

    def __init__(self, node: int, listen: str, timeout: float = 60.0) -> None:
        self.node, self.timeout = node, timeout
        self.mailbox = Mailbox(set())
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=OPTIONS)
        gossip_pb2_grpc.add_GossipServicer_to_server(self.mailbox, self.server)
        host = listen.rsplit(":", 1)[0]
        try:
            port = self.server.add_insecure_port(listen)
        except RuntimeError:
            port = 0
        if port == 0:
            raise PeerError(f"--listen: cannot listen on {listen}")
        self.address = f"{host}:{port}"
        self.server.start()
        self.peers: dict[int, str] = {}
        self._stubs: dict[int, gossip_pb2_grpc.GossipStub] = {}
        self._channels: list[grpc.Channel] = []

    def connect(self, peers: dict[int, str]) -> None:
        """Open channels to the neighbours (node id -> HOST:PORT) and accept payloads from them only."""
        self.peers = dict(peers)
        self.mailbox.senders = set(peers)
        for peer, address in peers.items():
            channel = grpc.insecure_channel(address, options=OPTIONS)
            self._channels.append(channel)
            self._stubs[peer] = gossip_pb2_grpc.GossipStub(channel)

    def deliver(self, peer: int, round_index: int, kind: str, payload: bytes) -> None:
        """Deliver a payload to a neighbour's mailbox, waiting up to `timeout` seconds for it to be reachable (a
        peer still starting is waited for, not an error)."""
        request = gossip_pb2.Payload(sender=self.node, round=round_index, kind=kind, tensors=payload)
        try:
            ack = self._stubs[peer].Deliver(request, timeout=self.timeout, wait_for_ready=True)
        except grpc.RpcError as e:
            raise PeerError(f"peer {peer} at {self.peers[peer]} does not answer ({e.code().name} within "
                            f"{self.timeout:g} s)") from None
        if not ack.accepted:
            raise PeerError(f"peer {peer} at {self.peers[peer]} refused node {self.node}: not its neighbour in the "
                            f"topology it runs (do both nodes use the same scenario and peers file?)")

    def close(self, grace: float = 5.0) -> None:
        """Close the channels and stop serving, letting deliveries in progress finish for up to `grace` seconds
        (a neighbour's last delivery may still await its acknowledgement)."""
        for channel in self._channels:
            channel.close()
        self.server.stop(grace=grace).wait()
