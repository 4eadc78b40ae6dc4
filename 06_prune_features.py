"""Stage 06: prune the train gallery into the look-up table (LUT) at the chosen threshold.

The threshold is prune.threshold when set (then stage 05 is not needed), else the one in
05_lut_threshold/threshold.json. The surviving train rows are recorded in the feature store,
keyed by model and threshold; lut.json lets stage 07 check that the LUT it reads is this one.

Reads:  04_extract_features/features.sqlite, 05_lut_threshold/threshold.json
Writes: the LUT in 04_extract_features/features.sqlite, 06_prune_features/lut.json,
        prune_summary.csv (per class: before, after, fraction kept), prune_summary.png
Usage:  python 06_prune_features.py -c configs/default.yaml --run runs/dyb [prune.threshold=0.93]
"""
from common import lut, stage


def main(ctx: stage.Context) -> dict:
    return lut.run_prune_stage(ctx)


if __name__ == "__main__":
    stage.run("06_prune_features", main, upstream=lut.prune_upstream, sections=("prune", "lut"))
