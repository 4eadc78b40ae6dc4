"""Shared code of the plankton retrieval pipeline (stages 01-07).

Stage scripts at the top level stay thin; everything that can be tested lives here.
"""
__version__ = "0.1.0"
