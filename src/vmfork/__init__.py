"""vmfork: a microVM manager built on fork-from-snapshot with copy-on-write isolation."""

__version__ = "0.1.0"
