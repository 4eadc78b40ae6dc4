"""Stage 02: exact per-channel mean and std of the train split, as the network sees the images.

Reads:  01_random_split_dataset/splits.csv
Writes: 02_mean_std_variables/stats.json ({"mean": [r,g,b], "std": [r,g,b], "pixels", "images",
        "image_size", "pad_fill", ...}: images converted to RGB, padded to a square with
        data.pad_fill, resized to model.image_size, values in [0, 1])
Usage:  python 02_mean_std_variables.py --run runs/dyb data.num_workers=8
"""
from common.stages import run

if __name__ == "__main__":
    run("02_mean_std_variables")
