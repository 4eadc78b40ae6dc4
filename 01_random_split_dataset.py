"""Stage 01: check every image of the data set and split each class into train / val / test.

Reads:  data.root, an image folder with one sub-folder per class (hidden files ignored)
Writes: 01_random_split_dataset/splits.csv (path,label,split,sha256,width,height,mode,dup_group),
        class_counts.csv, bad_images.csv, duplicates.csv, class_distribution.png
        (and train/ val/ test/ class folders with split.materialize=symlink|hardlink|copy)
Usage:  python 01_random_split_dataset.py -c configs/default.yaml --run runs/dyb data.root=/data/DYB-PlanktonNet

The splitting rule (stratified per class, duplicates kept together, small classes) is in the
docstring of common/split.py.
"""
from common.stages import run

if __name__ == "__main__":
    run("01_random_split_dataset")
