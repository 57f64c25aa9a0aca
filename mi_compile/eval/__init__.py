"""Accuracy harness: synthetic long-context tasks (:mod:`.tasks`) and the mode runner (:mod:`.harness`)."""
