"""Errors of the host agent."""

from __future__ import annotations

from ember.errors import EmberError


class AgentError(EmberError):
    """The agent cannot start or serve."""


class AgentRunning(AgentError):
    """Another agent already serves this ``$EMBER_HOME``."""
