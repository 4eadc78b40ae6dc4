"""Stage 03: train the backbone with Supervised Contrastive Learning (Khosla et al. 2020).

Reads:  01_random_split_dataset/splits.csv (train = training images, val = k-NN model selection),
        02_mean_std_variables/stats.json
Writes: 03_main_supcon/checkpoints/{last,best,epoch_NNNN}.pt, metrics.csv, loss_curve.png,
        augmentations.png, tensorboard/
Usage:  python 03_main_supcon.py --run runs/dyb train.epochs=100
        torchrun --nproc_per_node 4 03_main_supcon.py run.dir=runs/dyb
        (the reference SupContrast flags work too: --batch_size 64 --learning_rate 0.5 --temp 0.1 --cosine)

Rerunning after a crash, Ctrl-C or SIGTERM continues from checkpoints/last.pt exactly where it
stopped, with or without --force. --force on a finished training starts again and moves the old
checkpoints, metrics and logs to 03_main_supcon/previous-<UTC time>/ (never deleted).
"""
from common.stages import run

if __name__ == "__main__":
    run("03_main_supcon")
