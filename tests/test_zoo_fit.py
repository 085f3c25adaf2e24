"""A short fit of zoo models on real images (Fashion-MNIST padded to 32x32) runs on this CPU.

What a CPU-sized fit (tiny INR, ~100 steps, random base) can and cannot do, as measured
(one thread): the task loss falls, but the generated deep networks stay close to a constant
function of the input, so the fall is mostly the output layer's bias learning the label
frequencies. unet_r18: 2.40 -> 1.83 after 150 steps (predicting the pixel-class frequencies
exactly would give 1.30). resnet20: 2.3029 -> 2.2978 after 150 steps, and with a trained base,
200-400 reconstruction pre-fit steps (INR 64 wide, 8-16 frequencies) the generated network
stays at 2.9-9 (base: 0.66), then collapses to the prior (2.31) in the joint phase. A fit that
makes a generated ResNet beat chance needs the full INR and thousands of steps (a GPU job).
"""
import os

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import neumeta as nm
from neumeta.data import TensorLoader, load_fashion_mnist

FASHION = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not os.path.exists(FASHION), reason="needs Debian's dataset-fashion-mnist (CI installs it)")]

TINY_INR = nm.INRConfig(hidden=32, depth=3, frequencies=4)


@pytest.fixture(scope="module")
def images():
    """512 Fashion-MNIST training images, padded with background to 32x32."""
    x, y = load_fashion_mnist(download=False).train
    x = F.pad(x[:512], (2, 2, 2, 2), value=float(x.min()))
    return x, y[:512]


def task_loss(manifold, task, x, target, width):
    with torch.no_grad():
        params = manifold.generate(width)
        return float(task.loss(functional_call(manifold.space.model, params, (x,)), (x, target)))


def fit_and_compare(model, task, x, target, steps):
    """Task loss on 128 training images at widths 1.0 and 0.75, before and after ``steps`` of fit."""
    torch.manual_seed(0)
    model.eval()
    space = nm.WidthSpace(nm.smooth(nm.fold_batchnorm(model), x[:2])[0], x[:2])
    manifold = nm.WeightManifold(space, TINY_INR)
    probe = (x[:128], target[:128])
    before = {w: task_loss(manifold, task, *probe, w) for w in (1.0, 0.75)}
    config = nm.FitConfig(steps=steps, prefit_steps=0, lr=1e-2, warmup=0.0, recon_weight=1.0,
                          eval_every=10_000, seed=0)
    nm.fit(manifold, task, TensorLoader(x, target, batch_size=16), None, config, progress=False)
    after = {w: task_loss(manifold, task, *probe, w) for w in (1.0, 0.75)}
    return before, after


def segmentation_labels(x, y):
    """Every pixel brighter than the dataset mean is labelled with the item's class (1..10),
    the rest is background (0)."""
    foreground = x[:, 0] > 0.0  # normalised units: 0 is the mean brightness
    return torch.where(foreground, y[:, None, None] + 1, torch.zeros_like(foreground, dtype=torch.long))


def test_unet_r18_fit_lowers_the_segmentation_loss(images):
    x, y = images
    labels = segmentation_labels(x, y)
    model = nm.create_model("unet_r18", in_channels=1, num_classes=11, base=8, decoder_base=4)
    before, after = fit_and_compare(model, nm.SegmentationTask(11), x, labels, steps=100)
    for w in before:  # from uniform logits (ln 11 = 2.40)
        assert after[w] < before[w] - 0.3, (w, before[w], after[w])


@pytest.mark.xfail(strict=True, reason="measured: a tiny INR's ResNet-20 does not beat chance within "
                                       "a CPU test's budget (see the module docstring)")
def test_resnet20_fit_beats_chance(images):
    x, y = images
    model = nm.create_model("resnet20", in_channels=1, num_classes=10)
    before, after = fit_and_compare(model, nm.ClassificationTask(10), x, y, steps=100)
    for w in before:  # chance: ln 10 = 2.30; the class prior alone gives about the same here
        assert after[w] < 2.1, (w, before[w], after[w])
