"""The compute side: what runs on the node that uses a crate.

Owns ``ensure`` (:mod:`.ensure`: the warm look in :mod:`.cache`, the cold fill
in :mod:`.fill` under the crate lock of :mod:`.lock`), where archives come
from (:mod:`.sources`: paths and HTTP(S) URLs), extraction into a directory
(:mod:`.unpack`), relocation (:mod:`.relocate`), host and interpreter checks
(:mod:`.compat`), activation (:mod:`.activation`), leases (:mod:`.leases`),
events (:mod:`.events`) and cache administration: ls, verify, rm, gc
(:mod:`.admin`). The layout it keeps on disk is ``cache_layout.md``.

It may import the crate format's readers (:mod:`envcrate.crate`: manifest,
file table, container, reading, plan, frames, extract, record, platform) and
the ground floor (errors, ids, fsutil, procs, progress, network). It never
imports :mod:`envcrate.envs`, :mod:`envcrate.stores`, the writer, or
anything heavy at module level: a store is the caller's business
(:mod:`envcrate.fetching` hands :func:`.ensure.ensure_crate` a ``locate``
that returns a :class:`.sources.Source`). This is the part that a bootstrap
script will carry to nodes without envcrate, to run under the node's own
Python.

What it and the modules it imports still use that Python 3.6's standard
library lacks, to be replaced before it can travel:

- ``from __future__ import annotations`` (3.7) in every module, and
  :mod:`dataclasses` (3.7) in crate.manifest, crate.tar, crate.container,
  crate.plan, crate.reading, node.cache, node.compat, node.activation;
- assignment expressions ``:=`` (3.8) in crate.extract, crate.frames,
  crate.reading, fsutil, network, procs;
- ``subprocess.run(capture_output=..., text=...)`` (3.7) in node.compat;
  ``os.preadv`` (3.7) in crate.frames; ``os.copy_file_range`` (3.8, with a
  fallback) in fsutil; ``signal.raise_signal`` (3.8) in procs;
- third-party: ``zstandard`` for ``tar.zst`` archives (the design's
  fallbacks, the ``zstd`` command and Python 3.14's ``compression.zstd``,
  are not written yet; ``tar.gz`` crates need only zlib), ``platformdirs``
  for the default directories (node.cache falls back to the XDG path
  without it; node.compat's probe memo does not yet), ``tqdm`` for progress
  bars (only when shown).
"""
