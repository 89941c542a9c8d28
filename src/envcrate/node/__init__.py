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
that returns a :class:`.sources.Source`). It also owns the cold path of a
bootstrap script (:mod:`.boot`, with the script's sh in ``boot.sh``) and
reports (:mod:`.report`).

A bootstrap script carries it, with the readers it imports
(:data:`envcrate.bootstrap.PAYLOAD`), to nodes without envcrate, to run under
the node's own Python: so these modules keep to Python 3.6 and its standard
library (no ``from __future__ import annotations``, dataclasses, ``:=``,
``capture_output``; annotations quoted). What is third-party is optional:
``zstandard`` (else :mod:`envcrate.crate.zstdio`'s fallbacks, or tar.gz),
``platformdirs`` (else the XDG paths), ``tqdm`` (else no bar). The tests
check all of it (test_house with vermin; tests/node/test_boot.py under
every Python from 3.6 to 3.13).
"""
