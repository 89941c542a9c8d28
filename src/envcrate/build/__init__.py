"""Recipes, locks and builds: an environment described once (:mod:`.recipe`),
resolved to pins with hashes (:mod:`.lock`), built into a crate once per
build key (:mod:`.builder`)."""
