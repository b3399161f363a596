"""Privacy mechanisms as wrappers: a scenario's `privacy:` section names one, and it wraps the run's client rule
(DP-SGD: per-sample clipping and Gaussian noise around any rule's gradients) or, later, its server rule
(DP-FedAvg). Accounting (epsilon, delta) comes from a well-kept library, never a hand-written accountant."""

from __future__ import annotations

from fedsim.registry import Registry

PRIVACY: Registry = Registry("privacy mechanism")
"""Entries: `fn(params, rule) -> rule`, wrapping a client rule (meta `wraps="client"`)."""
