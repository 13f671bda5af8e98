"""Instances: metadata, derived state, lifecycle, forks."""

from vmfork.instances.manager import Manager
from vmfork.instances.model import Instance

__all__ = ["Instance", "Manager"]
