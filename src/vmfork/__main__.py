"""The ``vmfork`` command (and ``python -m vmfork``).

``vmfork --version`` is answered here, before the CLI is imported: click alone costs several
times Python's own start-up.
"""

from __future__ import annotations

import sys


def main() -> None:
    if sys.argv[1:] == ["--version"]:
        from vmfork import __version__

        sys.stdout.write(f"vmfork, version {__version__}\n")
        return
    from vmfork.cli import main as cli

    cli()


if __name__ == "__main__":
    main()
