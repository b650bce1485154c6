"""A tiny erasure plug-in (tests/plugins): a prompt-substitution method, its recipe and an attack."""
