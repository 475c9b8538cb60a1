"""The `valuekit` command (installed as the package `valuekit.cli`)."""
