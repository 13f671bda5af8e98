"""Typed errors. Every error a user can cause or meet is a VmforkError with one clear line."""

from __future__ import annotations


class VmforkError(Exception):
    """Base class: the CLI prints ``str(err)`` on one line and exits with ``exit_code``."""

    exit_code = 1


class InvalidArgument(VmforkError):
    """Bad user input (name, size, option value)."""

    exit_code = 2


class NotFound(VmforkError):
    exit_code = 3


class AlreadyExists(VmforkError):
    exit_code = 4


class WrongState(VmforkError):
    exit_code = 5


class Busy(VmforkError):
    """Another vmfork process holds the lock of this instance, or something still uses what
    is to be removed (an image used by an instance or a snapshot)."""

    exit_code = 6


class ExternalToolError(VmforkError):
    """An external tool (QEMU, mkfs, apt, ...) failed; its own message is kept."""

    def __init__(self, tool: str, message: str) -> None:
        self.tool = tool
        self.tool_message = message.strip()
        super().__init__(f"{tool} failed: {self.tool_message}")


class RegistryError(ExternalToolError):
    """A registry could not be reached or refused a pull (skopeo's own message kept): a
    failure upstream, neither the caller's input nor vmfork's."""


class RegistryNotFound(ExternalToolError, NotFound):
    """The registry answered that the image (its tag, digest or repository) does not exist."""


class HypervisorError(VmforkError):
    """The VMM refused or failed a request (QMP error, Firecracker fault_message, crash)."""


class AgentError(VmforkError):
    """The guest agent could not be reached or broke the protocol.

    ``transient`` is True where trying again may succeed (socket not there yet, refused,
    timed out); wait loops give up at once on the others.
    """

    def __init__(self, message: str, *, transient: bool = True) -> None:
        super().__init__(message)
        self.transient = transient


class AgentTimeout(AgentError):
    pass


class ExecAborted(AgentError):
    """A running exec was ended from the host side (the instance was put in standby,
    stopped or removed, or its VMM went away); the message says which."""

    def __init__(self, message: str) -> None:
        super().__init__(message, transient=False)


class ImageError(VmforkError):
    """Building or finding the guest image failed."""


class WrongPlatform(ImageError, NotFound):
    """The image exists, but not for the platform vmfork guests run (linux/amd64)."""


class NoSpace(VmforkError):
    """Not enough free space: refused by admission control, or the filesystem is full."""

    exit_code = 7
