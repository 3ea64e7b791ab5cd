import numpy as np
import torch
from PIL import Image

from evaluation.metrics import retrieval_accuracy
from evaluation.toy_metrics import read_image
from training.toy_world import world


def test_pixel_classifier_reads_real_images_exactly():
    scenes = world.scenes(3, 120, world.BACKGROUNDS)
    readings = [read_image(world.render(s)) for s in scenes]
    assert all(r.colour == s.colour for r, s in zip(readings, scenes))
    assert all(r.shape == s.shape for r, s in zip(readings, scenes))


def test_pixel_classifier_finds_nothing_on_an_empty_background():
    from PIL import Image

    reading = read_image(Image.new("RGB", (64, 64), (245, 245, 245)))
    assert reading.colour is None and reading.shape is None


def test_pixel_classifier_ignores_specks():
    img = np.asarray(world.render(world.scenes(4, 1)[0])).copy()
    truth = world.scenes(4, 1)[0]
    img[0:2, 0:2] = (0, 0, 255) if truth.colour != "blue" else (255, 0, 0)  # a stray saturated speck
    reading = read_image(Image.fromarray(img))
    assert (reading.colour, reading.shape) == (truth.colour, truth.shape)


def test_retrieval_accuracy_counts_argmax_hits():
    sim = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3]])
    assert retrieval_accuracy(sim, [0, 1, 1]) == 2 / 3
