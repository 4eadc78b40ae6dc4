"""Rendering only (knows no evaluation): figures and self-contained HTML."""
