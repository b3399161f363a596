"""Decentralized peers as separate processes: each node of a gossip scenario serves a mailbox over gRPC and
delivers its payloads to its neighbours' mailboxes (`fedsim/peers/gossip.proto`); tensors travel as safetensors."""
