"""The gaussian coordinate encoding (frequencies scaled per tensor by its channel counts), learned
per-channel features and the "relative" reconstruction loss: levers for an INR that holds every
tensor of a network whose layers differ in size and scale."""
import pytest
import torch

import neumeta as nm
from neumeta.inr import ChannelFeatures
from neumeta.io import load_manifold, save_manifold
from neumeta.train import reconstruction_errors, reconstruction_from_values, reconstruction_loss

X = torch.zeros(2, 1, 28, 28)


def _manifold(encoding, hidden=16, channel_features=0, **model):
    torch.manual_seed(0)
    base = nm.create_model("lenet", **(model or dict(conv1=4, conv2=6, fc1=16, fc2=8)))
    return nm.WeightManifold(nm.WidthSpace(base, X), nm.INRConfig(hidden=hidden, depth=3, frequencies=2, grid=False,
                                                                  encoding=encoding, channel_features=channel_features))


def test_one_channel_reads_the_same_features_in_a_narrow_and_a_wide_layer():
    """Channel (i, j) of a 4-in / 6-out tensor and of a 6-in / 16-out one: the same position in
    channels, so the same sin/cos features (only the raw coordinates differ)."""
    manifold = _manifold("gaussian")
    encoder = manifold.fourier
    by_name = {s.name: s for s in manifold.specs}
    small, large = by_name["conv2.weight"], by_name["fc2.weight"]
    channels = {s.name: manifold.space.layer_channels(s.layer, manifold.space.full) for s in (small, large)}
    assert channels["conv2.weight"] != channels["fc2.weight"]
    rows = []
    for spec in (small, large):
        c_in, c_out = channels[spec.name]
        v = torch.tensor([[0.3, (2 + 0.5) / c_in, (3 + 0.5) / c_out]])
        rows.append(encoder(v, spec.block)[:, 3:])
    torch.testing.assert_close(rows[0], rows[1])
    # and the features do depend on the channel: the next out channel reads different ones
    c_in, c_out = channels["fc2.weight"]
    moved = encoder(torch.tensor([[0.3, 2.5 / c_in, 4.5 / c_out]]), large.block)[:, 3:]
    assert (moved - rows[1]).abs().max() > 1e-2


def test_a_gaussian_manifold_saves_and_loads_to_the_same_networks(tmp_path):
    manifold = _manifold("gaussian")
    before = manifold.generate(0.75)
    loaded = load_manifold(save_manifold(manifold, tmp_path / "m.safetensors"))
    assert loaded.inr_config.encoding == "gaussian"
    after = loaded.generate(0.75)
    for name in before:
        torch.testing.assert_close(before[name], after[name])


def test_bad_encoding_options_are_refused():
    for bad in (dict(encoding="sine"), dict(encoding="gaussian", encoding_scale=0.0)):
        with pytest.raises(ValueError, match="encoding"):
            nm.INRConfig(**bad)


def test_the_relative_loss_weighs_every_tensor_alike_whatever_its_scale():
    torch.manual_seed(0)
    targets = [torch.randn(8, 3), torch.randn(20, 1)]
    values = [t + 0.1 * torch.randn_like(t) for t in targets]
    scaled_t = [targets[0] * 100, targets[1]]
    scaled_v = [values[0] * 100, values[1]]
    relative = reconstruction_from_values(values, targets, "relative")
    torch.testing.assert_close(relative, reconstruction_from_values(scaled_v, scaled_t, "relative"))
    mean = reconstruction_from_values(values, targets, "mean")
    assert reconstruction_from_values(scaled_v, scaled_t, "mean") > 100 * mean
    by_hand = sum(((v - t).pow(2) * (1 + t.pow(2) / t.pow(2).mean())).mean() / t.pow(2).mean()
                  for v, t in zip(values, targets)) / 2
    torch.testing.assert_close(relative, by_hand)


def _prefit_mean_error(encoding, steps=200, channel_features=0):
    """The mean relative error over tensors after a short noise-free pre-fit of a random LeNet."""
    manifold = _manifold(encoding, hidden=64, channel_features=channel_features, conv1=8, conv2=32, fc1=32, fc2=16)
    targets = manifold.original_rows()
    optimizer = torch.optim.Adam(manifold.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = reconstruction_loss(manifold, targets, noise=False)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    errors = reconstruction_errors(manifold)
    return sum(errors.values()) / len(errors)


def test_the_gaussian_encoding_holds_a_network_better_than_the_papers():
    """Same INR, same steps: features that mix the two channel axes leave the tensors closer to the
    reference than powers of two of each axis alone (0.15 against 0.53 when written)."""
    paper = _prefit_mean_error("powers")
    ours = _prefit_mean_error("gaussian")
    assert ours < 0.8 * paper, (ours, paper)


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


def test_every_tensor_gets_channel_tables_of_its_full_channel_counts():
    manifold = _manifold("powers", channel_features=5)
    encoder = manifold.fourier
    for spec in manifold.specs:
        c_in, c_out = manifold.space.layer_channels(spec.layer, manifold.space.full)
        assert encoder.inputs[spec.block].shape == ((1 if spec.bias else c_in), 5), spec.name
        assert encoder.outputs[spec.block].shape == (c_out, 5), spec.name
    assert manifold.inr.w_in.shape[1] == encoder.encoding.out_dim(3) + 10


def test_a_manifold_with_channel_features_saves_and_loads_to_the_same_networks(tmp_path):
    manifold = _manifold("powers", channel_features=4)
    with torch.no_grad():
        for table in [*manifold.fourier.inputs, *manifold.fourier.outputs]:
            table.normal_()  # trained-looking tables, so the load must bring them back
    before = manifold.generate(0.75)
    loaded = load_manifold(save_manifold(manifold, tmp_path / "m.safetensors"))
    assert loaded.inr_config.channel_features == 4
    after = loaded.generate(0.75)
    for name in before:
        torch.testing.assert_close(before[name], after[name])
    with pytest.raises(ValueError, match="channel_features"):
        nm.INRConfig(channel_features=-1)


def test_channel_features_hold_a_network_better_than_the_encoding_alone():
    """Same INR, same steps: a feature per channel lets the MLP tell apart channels that the
    powers-of-two encoding blurs, so the tensors end closer to the reference (0.17 against 0.53
    when written)."""
    plain = _prefit_mean_error("powers")
    ours = _prefit_mean_error("powers", channel_features=8)
    assert ours < 0.8 * plain, (ours, plain)


def test_the_prefit_decay_takes_the_learning_rate_to_zero_and_leaves_the_joint_schedule():
    from neumeta.train import _schedule
    plain, decaying = (_schedule(nm.FitConfig(prefit_steps=100, steps=50, prefit_decay=d)) for d in (False, True))
    assert plain(99) == 1.0 and decaying(0) == 1.0
    assert decaying(50) == pytest.approx(0.5) and decaying(99) < 0.01
    assert [plain(s) for s in range(100, 150)] == [decaying(s) for s in range(100, 150)]


def _prefit(**options) -> nm.WeightManifold:
    from neumeta.data import TensorLoader
    manifold = _manifold("gaussian")
    loader = TensorLoader(torch.zeros(8, 1, 28, 28), torch.zeros(8, dtype=torch.long), batch_size=4)
    nm.fit(manifold, nm.ClassificationTask(10), loader, None,
           nm.FitConfig(prefit_steps=5, steps=0, seed=0, **options), progress=False)
    return manifold


def test_prefit_noise_switches_the_noise_off_in_the_prefit_alone():
    """prefit_noise=False with recon_noise on: the pre-fit is the noise-free one, step for step
    (and not the noisy one); the option's default follows recon_noise."""
    quiet = _prefit(recon_noise=True, prefit_noise=False)
    centres = _prefit(recon_noise=False)
    noisy = _prefit(recon_noise=True)
    followed = _prefit(recon_noise=True, prefit_noise=None)
    for a, b, c, d in zip(quiet.parameters(), centres.parameters(), noisy.parameters(), followed.parameters()):
        assert torch.equal(a, b) and torch.equal(c, d)
    assert any(not torch.equal(a, c) for a, c in zip(quiet.parameters(), noisy.parameters()))


def test_joint_lr_scales_the_joint_phase_alone():
    from neumeta.train import _schedule
    same, lower = (_schedule(nm.FitConfig(prefit_steps=10, steps=20, lr=1e-3, joint_lr=j, warmup=0.5))
                   for j in (None, 1e-4))
    assert [same(s) for s in range(10)] == [lower(s) for s in range(10)] == [1.0] * 10  # the pre-fit at lr
    assert same(19) == pytest.approx(1.0) and lower(19) == pytest.approx(0.1)  # the joint peak, after warm-up
    assert [lower(s) for s in range(10, 30)] == pytest.approx([0.1 * same(s) for s in range(10, 30)])
    with pytest.raises(ValueError, match="joint_lr"):
        nm.FitConfig(joint_lr=0.0)


def test_noise_ramp_grows_the_coordinate_noise_over_the_joint_phase():
    """noise_ramp: the jitter grows linearly from none over that fraction of the joint steps; a
    fraction f of the noise moves every coordinate f times as far (same draw), and fit leaves the
    manifold drawing all of it, as sampling does."""
    from neumeta.train import noise_fraction
    config = nm.FitConfig(prefit_steps=10, steps=20, noise_ramp=0.5)
    assert [noise_fraction(s, config) for s in (0, 9)] == [1.0, 1.0]  # the pre-fit: prefit_noise decides
    assert [noise_fraction(s, config) for s in (10, 14, 19, 20, 29)] == pytest.approx([0.1, 0.5, 1.0, 1.0, 1.0])
    assert noise_fraction(10, nm.FitConfig(prefit_steps=10, steps=20)) == 1.0  # no ramp: all at once
    with pytest.raises(ValueError, match="noise_ramp"):
        nm.FitConfig(noise_ramp=1.5)

    manifold = _manifold("powers")
    counts = manifold.space.full
    with torch.no_grad():
        centre = torch.cat([v.flatten() for v in manifold.row_values(counts, noise=False)])
        moved = {}
        for f in (0.0, 0.1, 1.0):
            manifold.noise_fraction = f
            values = manifold.row_values(counts, noise=True, generator=torch.Generator().manual_seed(1))
            moved[f] = torch.cat([v.flatten() for v in values])
    assert torch.equal(moved[0.0], centre)
    assert 0 < (moved[0.1] - centre).abs().max() < (moved[1.0] - centre).abs().max()

    from neumeta.data import TensorLoader
    loader = TensorLoader(torch.zeros(8, 1, 28, 28), torch.zeros(8, dtype=torch.long), batch_size=4)
    fitted = {}
    for ramp in (0.0, 1.0):
        manifold = _manifold("powers")
        manifold.noise_fraction = 0.3
        nm.fit(manifold, nm.ClassificationTask(10), loader, None,
               nm.FitConfig(prefit_steps=1, steps=3, noise_ramp=ramp, eval_every=10, seed=0), progress=False)
        assert manifold.noise_fraction == 1.0
        fitted[ramp] = manifold
    # same seed, same draws: only the ramped noise tells the two fits apart
    assert any(not torch.equal(a, b) for a, b in zip(fitted[0.0].parameters(), fitted[1.0].parameters()))
