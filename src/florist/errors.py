"""The exceptions florist raises for bad input. Every message names what is wrong."""

from __future__ import annotations


class FloristError(Exception):
    """Base class of every error florist raises on purpose."""


class ConfigError(FloristError, ValueError):
    """A configuration value, option or argument is invalid."""


class InvalidUpdate(FloristError, ValueError):
    """A client's LoRA update cannot be aggregated.

    Parameters
    ----------
    client : str | None
        Id of the offending client (``None`` when the problem is not tied to one client).
    reason : str
        What is wrong, with the offending value.
    module : str | None
        Adapted module (e.g. ``model.layers.3.self_attn.q_proj``) the problem concerns, if any.
    round : int | None
        Federated round the update belongs to, if known.
    """

    def __init__(
        self,
        client: str | None,
        reason: str,
        *,
        module: str | None = None,
        round: int | None = None,
    ) -> None:
        self.client = client
        self.module = module
        self.round = round
        self.reason = reason
        where = []
        if client is not None:
            where.append(f"client {client!r}")
        if round is not None:
            where.append(f"round {round}")
        if module is not None:
            where.append(f"module {module!r}")
        prefix = ", ".join(where)
        super().__init__(f"{prefix}: {reason}" if prefix else reason)


class FederationError(FloristError, RuntimeError):
    """The federation cannot go on: a node failed to start, too few nodes joined, or restoring the
    nodes after a server restart failed. The message names the node and its own one-line reason."""


class QuorumLost(FloristError, RuntimeError):
    """Too many consecutive rounds without enough usable updates; the run stopped after a checkpoint."""
