"""Stage 06: prune the train gallery into the look-up table (LUT) at the chosen threshold.

The threshold is prune.threshold when set (then stage 05 is not needed), else the one in
05_lut_threshold/threshold.json. The LUT is this stage's own artefact: lut.sqlite, a
self-contained gallery (kept vectors, labels, image paths, the model) with the feature store's
schema, that a user can copy to another machine.

Reads:  04_extract_features/features.sqlite + model.json, 05_lut_threshold/threshold.json
Writes: 06_prune_features/lut.sqlite, lut.json, prune_summary.csv (per class: before, after,
        fraction kept), prune_summary.png
Usage:  python 06_prune_features.py --run runs/dyb [prune.threshold=0.93]
"""
from common.stages import run

if __name__ == "__main__":
    run("06_prune_features")
