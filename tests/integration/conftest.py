from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from vmfork.images import Image, ensure_image


@pytest.fixture(scope="session")
def image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    """The default guest image, built once per session (reused across sessions when
    VMFORK_TEST_IMAGES names a persistent dir)."""
    env = os.environ.get("VMFORK_TEST_IMAGES")
    images_dir = Path(env) if env else tmp_path_factory.mktemp("images")
    t0 = time.monotonic()
    im = ensure_image(images_dir, progress=lambda msg: print(f"[image] {msg}"))
    print(f"[image] {im.dir} ready in {time.monotonic() - t0:.1f}s")
    return im
