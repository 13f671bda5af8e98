"""Keeping guests alive on a filling filesystem: admission control and a watchdog.

QEMU guest RAM is a shared mapping of ``guests/<id>/memory``. A guest page that needs a
new block (a page never written, or a copy-on-write of a reflinked one) is allocated when
the guest first writes it; on a full filesystem that allocation fails and QEMU dies of
SIGBUS with the guest's RAM. Three defences:

- **Admission** (``admission``): ``run``, ``start``, ``restore``, ``resume`` and ``fork``
  (when a guest will run afterwards) refuse when the free space is below what the guests
  on this filesystem could still claim, plus the watchdog's low-water mark. What a guest
  can still claim is its RAM size minus the blocks its mem-file owns alone: a fresh boot
  claims all its RAM; a restore of a mem-file with allocated blocks claims the rest; a
  fork's mem-file whose extents are all shared claims all its RAM (each page it writes is
  copied). ``--overcommit`` (``overcommit=True``) starts it anyway.
- **The watchdog** (``watchdog``): one light process per data dir, started with the first
  VMM and gone with the last, pauses every guest whose RAM is a file here when the free
  space falls below the low-water mark, and resumes them when it is back above the
  high-water mark (or on ``vmfork resume``).
- **A named cause** (``vmfork.supervisor``): a guest that died anyway is shown as stopped
  with "guest RAM could not be written: filesystem full".
"""
