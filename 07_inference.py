"""Stage 07: classify the test split (or a folder of new images) against the LUT; metrics and report.

Reads:  04_extract_features/features.sqlite + model.json (and the checkpoint it names, in predict
        mode), 06_prune_features/lut.sqlite, 01's splits.csv, and 05_lut_threshold/
        threshold_sweep.png + threshold.json when present
Writes: evaluate mode: 07_inference/predictions.csv, metrics.json, report.html,
        classification_report.csv, confusion_matrix.png, embedding_map.png, comparison.csv,
        classifiers/ (fitted classical classifiers);
        predict mode: 07_inference/predict/<inference.name>/ (default the input's name):
        predictions.csv, sample_counts.csv + .png, ecotaxa_<name>.tsv, review.html, corrections.csv,
        metrics.json, report.html
Usage:  python 07_inference.py --run runs/dyb inference.gallery=lut
        python 07_inference.py --run runs/dyb inference.mode=predict inference.input=cruise_42/
        python 07_inference.py --run runs/dyb "inference.unknown_classes=[a, b]" inference.reject_below=auto
"""
from common.stages import run

if __name__ == "__main__":
    run("07_inference")
