"""Two-view training augmentations."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from common.config.load import load_config
from common.data.augment import RandomRot90, TwoViews, denormalize, train_transform

MEAN, STD = [0.2, 0.3, 0.4], [0.25, 0.2, 0.15]


def _image(w: int = 40, h: int = 20, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    a = np.zeros((h, w, 3), np.uint8)
    a[2:h - 2, 3:w // 2] = rng.integers(60, 255, 3)  # an off-centre coloured block: flips/rotations show
    return Image.fromarray(a)


def test_two_views_differ_and_have_the_network_shape():
    cfg = load_config(None, ["model.image_size=16"])
    views = TwoViews(train_transform(cfg, MEAN, STD))
    torch.manual_seed(0)
    v1, v2 = views(_image())
    assert v1.shape == v2.shape == (3, 16, 16) and v1.dtype == torch.float32
    assert not torch.equal(v1, v2)
    torch.manual_seed(0)
    w1, w2 = views(_image())  # every random choice comes from torch's generator
    assert torch.equal(v1, w1) and torch.equal(v2, w2)


def test_without_randomness_the_view_is_the_padded_normalised_image():
    cfg = load_config(None, ["model.image_size=8", "train.crop_scale=[1.0, 1.0]", "train.hflip=0", "train.vflip=0",
                               "train.rot90=false", "train.color_jitter_p=0", "train.grayscale_p=0", "data.pad_fill=0"])
    img = Image.fromarray(np.full((4, 8, 3), 255, np.uint8))  # white 8x4 -> padded 8x8: rows 0-1 and 6-7 black
    torch.manual_seed(0)
    x = train_transform(cfg, MEAN, STD)(img)
    back = denormalize(x, MEAN, STD)
    assert back.shape == (3, 8, 8)
    assert torch.allclose(back[:, 2:6], torch.ones(3, 4, 8), atol=1e-6)
    assert torch.allclose(back[:, :2], torch.zeros(3, 2, 8), atol=1e-6)


def test_denormalize_inverts_normalize_and_clips():
    x = torch.rand(2, 3, 5, 5)
    m, s = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    assert torch.allclose(denormalize((x - m) / s, MEAN, STD), x, atol=1e-6)
    assert denormalize(torch.full((3, 2, 2), 100.0), MEAN, STD).max() == 1.0


def test_rot90_covers_the_four_rotations_on_pil_and_tensor():
    t = torch.arange(4.0).view(1, 2, 2)
    rot = RandomRot90()
    torch.manual_seed(0)
    seen = {tuple(rot(t).flatten().tolist()) for _ in range(40)}
    assert seen == {tuple(torch.rot90(t, k, (-2, -1)).flatten().tolist()) for k in range(4)}
    img = _image(6, 4)
    sizes = {rot(img).size for _ in range(20)}
    assert sizes == {(6, 4), (4, 6)}


def test_greyscale_and_jitter_probabilities_apply():
    cfg = load_config(None, ["model.image_size=8", "train.grayscale_p=1.0", "train.color_jitter_p=0"])
    torch.manual_seed(0)
    x = denormalize(train_transform(cfg, MEAN, STD)(_image(seed=3)), MEAN, STD)
    assert torch.allclose(x[0], x[1], atol=1e-5) and torch.allclose(x[1], x[2], atol=1e-5)
