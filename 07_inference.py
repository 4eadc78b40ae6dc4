"""Stage 07: classify the test split (or a folder of new images) against the LUT; metrics and report.

Reads:  04_extract_features/features.sqlite (vectors, the pruned LUT of stage 06), the checkpoint
        of stage 03 (predict mode, or test images absent from the store), 01's splits.csv,
        02's stats.json, and 05_lut_threshold/threshold_sweep.png + threshold.json when present
Writes: 07_inference/predictions.csv, metrics.json, report.html and, in evaluate mode,
        classification_report.csv, confusion_matrix.png, embedding_map.png, comparison.csv,
        classifiers/ (fitted classical classifiers)
Usage:  python 07_inference.py -c configs/default.yaml --run runs/dyb inference.gallery=lut
        python 07_inference.py -c configs/default.yaml --run runs/dyb inference.mode=predict inference.input=new/
"""
from common import inference, stage

BASE = ["01_random_split_dataset", "02_mean_std_variables", "03_main_supcon", "04_extract_features"]


def upstream(cfg) -> list[str]:
    # the pruned LUT lives in the store once stage 06 has run; the full gallery needs only stage 04
    return BASE + (["06_prune_features"] if cfg.inference.gallery == "lut" else [])


def external(cfg) -> list[str]:
    return [cfg.inference.input] if cfg.inference.mode == "predict" and cfg.inference.input else []


def main(ctx: stage.Context) -> dict:
    return inference.run_stage(ctx)


if __name__ == "__main__":
    stage.run("07_inference", main, upstream=upstream, optional_upstream=("05_lut_threshold",),
              sections=("inference",), external=external)
