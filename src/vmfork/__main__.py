"""The ``vmfork`` command (and ``python -m vmfork``).

``vmfork --version`` and ``vmfork ps --json`` (``vmfork.fastpath``) are answered here,
before the CLI is imported: click alone costs several times Python's own start-up.
"""

from __future__ import annotations

import sys


def main() -> None:
    if sys.argv[1:] == ["--version"]:
        from vmfork import __version__

        sys.stdout.write(f"vmfork, version {__version__}\n")
        return
    if "ps" in sys.argv[1:]:
        from vmfork.fastpath import ps_json

        text = ps_json(sys.argv[1:])
        if text is not None:
            sys.stdout.write(text)
            return
    from vmfork.cli import main as cli

    cli()


if __name__ == "__main__":
    main()
