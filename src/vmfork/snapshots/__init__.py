"""Named, immutable snapshots: the store (``store``), content digests (``digest``),
space accounting (``space``), lineage (``lineage``) and export/import (``archive``)."""
