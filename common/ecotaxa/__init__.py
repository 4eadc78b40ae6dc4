"""EcoTaxa both ways: reading exports to train or predict on, writing bundles it imports; knows no run
folder."""
