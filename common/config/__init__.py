"""Typed configuration (library: knows no run folder)."""
