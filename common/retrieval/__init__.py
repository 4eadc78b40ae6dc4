"""Search and LUT pruning: exact (in memory, streamed, reduced-precision kernel) and approximate
(FAISS)."""
