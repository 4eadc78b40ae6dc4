"""Search and LUT pruning."""
