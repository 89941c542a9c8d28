"""Glue for workflow systems that start the tasks envcrate's crates serve:
:mod:`.radical` (RADICAL-Pilot). Each is importable without the system it
serves, and gives plain values (strings, lists, dicts) to hand to it."""
