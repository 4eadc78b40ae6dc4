"""Decisions and their measurement (library: returns results, writes nothing)."""
