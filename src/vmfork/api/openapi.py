"""Write (or ``--check``) the committed OpenAPI document, ``docs/openapi.json``.

    python -m vmfork.api.openapi           # regenerate
    python -m vmfork.api.openapi --check   # exit 1 if docs/openapi.json is stale (make lint)
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

DOC = Path(__file__).resolve().parents[3] / "docs" / "openapi.json"


def document() -> dict[str, Any]:
    from vmfork.api.app import create_app

    with tempfile.TemporaryDirectory() as d:
        doc: dict[str, Any] = create_app(Path(d)).openapi()
    return doc


def render() -> str:
    return json.dumps(document(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not DOC.exists() or DOC.read_text() != text:
            print(f"{DOC} is stale: run 'python -m vmfork.api.openapi'", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(text)
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
