"""The crate format: what a crate archive is, and how it is written and read.

Owns the manifest and crate ids (:mod:`.manifest`), the file table's checks
(:mod:`.tree`), tar headers (:mod:`.tar`), the container around them:
formats, codecs, head, trailer, seek table (:mod:`.container`), the platform
a crate records (:mod:`.platform`), store and archive records
(:mod:`.record`); on the writing side the entries to archive (:mod:`.entry`),
pyc rewriting (:mod:`.pyc`), prefix and ELF scanning (:mod:`.scan`,
:mod:`.elf`), the env's files as input (:mod:`.inputs`), compressing
workers (:mod:`.workers`) and the body writer (:mod:`.writer`); on the reading
side the stream reader (:mod:`.reading`), the plan of a seekable crate
(:mod:`.plan`), extraction by frames (:mod:`.frames`) and by stream
(:mod:`.extract`), and ``verify`` (:mod:`.verify`).

It is the ground of the domain: it may import only the ground floor
(errors, ids, fsutil, procs, progress), never :mod:`envcrate.envs`,
:mod:`envcrate.stores`, :mod:`envcrate.node` or the command line. The
readers import nothing of the writer's side. The story of ``pack`` (a source
env read by :mod:`envcrate.envs`, written by :mod:`.writer`) is
:mod:`envcrate.packing`, above both.
"""
