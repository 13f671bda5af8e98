"""schemathesis hooks for test_api.py's fuzzing (SCHEMATHESIS_HOOKS=tests.integration.fuzz_hooks).

Negative mode sometimes sends a *valid* request as an "invalid" one (null for an optional
field, a header it counts as wrong): for POST /instances and POST /images that would boot a
VM or pull from a registry on the internet. Those cases are dropped here: only requests the
server refuses before any work (body or reference invalid, unknown query parameter) go out."""

from __future__ import annotations

from typing import Any

import schemathesis

# operation -> (its body model, its query parameters)
GUARDED: dict[str, tuple[str, set[str]]] = {"POST /instances": ("CreateInstance", set()),
                                            "POST /images": ("PullImage", {"wait", "stream"})}


def refused(label: str, body: Any, query: dict[str, Any] | None) -> bool:
    """True where the server answers 400 before doing anything (as its own checks would)."""
    from vmfork import models
    from vmfork.errors import VmforkError
    from vmfork.images import oci

    model_name, params = GUARDED[label]
    if set(query or {}) - params:
        return True  # unknown query parameter
    if not isinstance(body, dict):
        return True
    try:
        parsed = getattr(models, model_name).model_validate(body)
    except ValueError:
        return True
    if model_name == "PullImage":
        try:
            oci.parse_ref(parsed.name)
        except VmforkError:
            return True
    return False


@schemathesis.hook
def filter_case(context: Any, case: Any) -> bool:
    label = str(case.operation.label)
    return label not in GUARDED or refused(label, case.body, case.query)
