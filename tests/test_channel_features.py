"""Learned per-channel features (``INRConfig(channel_features=d)``): read by interpolation at the
coordinate, saved with the manifold, and a pre-fit that holds the reference better than the
encoding alone."""
import pytest
import torch

import neumeta as nm
from neumeta.inr import ChannelFeatures
from neumeta.io import load_manifold, save_manifold
from neumeta.train import reconstruction_errors, reconstruction_loss

X = torch.zeros(2, 1, 28, 28)


def _manifold(features, hidden=16, **model):
    torch.manual_seed(0)
    base = nm.create_model("lenet", **(model or dict(conv1=4, conv2=6, fc1=16, fc2=8)))
    return nm.WeightManifold(nm.WidthSpace(base, X),
                             nm.INRConfig(hidden=hidden, depth=3, frequencies=2, channel_features=features))


def test_a_channel_centre_reads_its_own_row_and_a_wider_cell_the_mean_of_its_rows():
    table = torch.randn(4, 3)
    centres = (torch.arange(4) + 0.5) / 4
    torch.testing.assert_close(ChannelFeatures.read(table, centres), table)
    # width 2 of 4: channel k's centre (k + 1/2)/2 lies between full channels 2k and 2k + 1
    halves = ChannelFeatures.read(table, (torch.arange(2) + 0.5) / 2)
    torch.testing.assert_close(halves, (table[0::2] + table[1::2]) / 2)
    # outside the centres it holds the edge rows; a one-row table (a bias's input) is constant
    torch.testing.assert_close(ChannelFeatures.read(table, torch.tensor([0.0, 1.0])), table[[0, 3]])
    one = torch.randn(1, 3)
    torch.testing.assert_close(ChannelFeatures.read(one, torch.tensor([0.0, 0.7])), one.expand(2, 3))


def test_every_tensor_gets_tables_of_its_full_channel_counts():
    manifold = _manifold(5)
    encoder = manifold.fourier
    for spec in manifold.specs:
        c_in, c_out = manifold.space.layer_channels(spec.layer, manifold.space.full)
        assert encoder.inputs[spec.block].shape == ((1 if spec.bias else c_in), 5), spec.name
        assert encoder.outputs[spec.block].shape == (c_out, 5), spec.name
    assert manifold.inr.w_in.shape[1] == encoder.encoding.out_dim(3) + 10


def test_a_manifold_with_channel_features_saves_and_loads_to_the_same_networks(tmp_path):
    manifold = _manifold(4)
    with torch.no_grad():
        for table in [*manifold.fourier.inputs, *manifold.fourier.outputs]:
            table.normal_()  # trained-looking tables, so the load must bring them back
    before = manifold.generate(0.75)
    loaded = load_manifold(save_manifold(manifold, tmp_path / "m.safetensors"))
    assert loaded.inr_config.channel_features == 4
    after = loaded.generate(0.75)
    for name in before:
        torch.testing.assert_close(before[name], after[name])


def test_negative_channel_features_are_refused():
    with pytest.raises(ValueError, match="channel_features"):
        nm.INRConfig(channel_features=-1)


def _prefit_mean_error(features, steps=200):
    """The mean relative error over tensors after a short noise-free pre-fit of a random LeNet."""
    manifold = _manifold(features, hidden=64, conv1=8, conv2=32, fc1=32, fc2=16)
    optimizer = torch.optim.Adam(manifold.parameters(), lr=3e-3)
    targets = manifold.original_rows()
    for _ in range(steps):
        loss = reconstruction_loss(manifold, targets, noise=False)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    errors = reconstruction_errors(manifold)
    return sum(errors.values()) / len(errors)


def test_channel_features_hold_a_network_better_than_the_encoding_alone():
    """Same INR, same steps: a feature per channel lets the MLP tell channels apart that the
    powers-of-two encoding blurs, so the tensors end closer to the reference."""
    plain = _prefit_mean_error(0)
    ours = _prefit_mean_error(8)
    assert ours < 0.8 * plain, (ours, plain)
