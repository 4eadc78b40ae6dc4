"""Stage 04: embed every image of every split with one checkpoint into the feature store.

Reads:  03_main_supcon/checkpoints/<extract.checkpoint>.pt (best | last, or a path; its own
        preprocessing: mean/std, image size, pad fill), 01_random_split_dataset/splits.csv, and the
        gallery-only images of data.gallery_extra (class folders or filled corrections.csv files;
        split "extra"); 02_mean_std_variables is checked up to date, its stats.json is not read
Writes: 04_extract_features/features.sqlite (images, the model, one L2-normalised float32 vector
        per image; resumable: an interrupted run continues where it stopped), model.json (the model
        and embedding that stages 05-07 read)
Usage:  python 04_extract_features.py --run runs/dyb extract.batch_size=256
        torchrun --nproc_per_node=4 04_extract_features.py run.dir=runs/dyb
        (under torchrun give the run folder as run.dir=...: torchrun takes --run for its own --run-path)
"""
from common.stages import run

if __name__ == "__main__":
    run("04_extract_features")
