"""EcoTaxa both ways (issue 19); knows no run folder."""
