"""Stage 05: find the LUT pruning threshold on the validation split.

For every threshold of the grid (lut.thresholds, or lut.grid_start..grid_stop by grid_step) the
train gallery is pruned by the LUT rule (Yang et al. 2022: within a class, an item removes every
later item more similar than the threshold) and every val vector is classified against the pruned
gallery (top-1 and DINO's weighted k-NN). The threshold is chosen by lut.rule (default: the
smallest gallery whose val macro-F1 is within lut.tolerance of the best).

Reads:  04_extract_features/features.sqlite (train = gallery, val = queries; one model)
Writes: 05_lut_threshold/threshold_sweep.csv, threshold.json (threshold, rule, reason, metrics,
        model id, suggested_reject_below for stage 07), threshold_sweep.png
Usage:  python 05_lut_threshold.py --run runs/dyb lut.rule=max_f1
"""
from common.stages import run

if __name__ == "__main__":
    run("05_lut_threshold")
