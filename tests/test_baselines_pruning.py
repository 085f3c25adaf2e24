"""baselines.pruning: torch-pruning importances, pruned to exactly the manifold's channel counts.

A pruned network must compute what the full network computes with the removed channels silenced,
whatever importance chose them; and it must have exactly the requested channels in every group.
"""
import copy

import pytest
import torch
import torch.nn as nn

import neumeta as nm
from neumeta.baselines.pruning import IMPORTANCES, channel_scores, finetune, highest, kept_channels, prune
from neumeta.data import TensorLoader
from neumeta.experiment import Data
from test_smooth import randomise_norms  # random BatchNorm parameters and statistics, as if trained


def lenet_and_input():
    return nm.create_model("lenet").eval(), torch.randn(2, 1, 28, 28)


def resnet20_and_input():
    return randomise_norms(nm.create_model("resnet20")), torch.randn(2, 3, 32, 32)


def batchnorm_after(conv: str) -> str:
    """The BatchNorm a CIFAR ResNet's conv feeds (conv1 -> bn1, shortcut.0 -> shortcut.1)."""
    if conv.endswith("shortcut.0"):
        return conv[:-1] + "1"
    head, _, tail = conv.rpartition("conv")
    return head + "bn" + tail


def masked(model, example, removed):
    """A copy of ``model`` whose ``removed`` channels ({group: indices}) output zero wherever they
    are produced: the producers' weight rows and biases, and their BatchNorms' scale and shift."""
    model = copy.deepcopy(model)
    space = nm.WidthSpace(model, example)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for group, channels in removed.items():
            index = torch.tensor(channels, dtype=torch.long)
            for producer in space.groups[group].producers:
                layer = modules[producer]
                layer.weight[index] = 0
                if layer.bias is not None:
                    layer.bias[index] = 0
                bn = modules.get(batchnorm_after(producer))
                if isinstance(bn, nn.BatchNorm2d):
                    bn.weight[index] = 0
                    bn.bias[index] = 0
    return model


@pytest.mark.parametrize("build", [lenet_and_input, resnet20_and_input], ids=["lenet", "resnet20"])
@pytest.mark.parametrize("importance", ["l1", "random"])
def test_pruned_model_computes_the_masked_full_model(build, importance):
    model, x = build()
    space = nm.WidthSpace(model, x)
    counts = space.resolve(0.5)
    keep = kept_channels(model, x, counts, importance, seed=3)
    removed = {g: sorted(set(range(space.full[g])) - set(k)) for g, k in keep.items()}
    assert all(removed.values())
    pruned = prune(model, x, counts, importance, seed=3).eval()
    inputs = torch.randn(4, *x.shape[1:])
    with torch.no_grad():
        torch.testing.assert_close(pruned(inputs), masked(model, x, removed)(inputs), rtol=1e-4, atol=1e-5)
        # and the silenced channels did matter: the mask changed the full model's outputs
        assert not torch.allclose(model(inputs), pruned(inputs), atol=1e-4)


@pytest.mark.parametrize("build", [lenet_and_input, resnet20_and_input], ids=["lenet", "resnet20"])
def test_every_group_keeps_exactly_the_requested_channels(build):
    model, x = build()
    space = nm.WidthSpace(model, x)
    modules = dict(model.named_modules())
    full_params = sum(p.numel() for p in model.parameters())
    for width in (0.3, 0.5, 0.77):
        counts = space.resolve(width)
        pruned = prune(model, x, counts, "l1")
        layers = dict(pruned.named_modules())
        for group, count in counts.items():
            for producer in space.groups[group].producers:
                assert layers[producer].weight.shape[0] == count, (width, group, producer)
                assert modules[producer].weight.shape[0] == space.full[group]
        assert sum(p.numel() for p in pruned.parameters()) < full_params
        with torch.no_grad():
            assert pruned(x).shape == model(x).shape


def test_l1_keeps_the_channels_of_largest_l1_norm():
    model, x = lenet_and_input()
    conv_scale = torch.randperm(16).float() + 1      # conv1 channel c: every weight = conv_scale[c]
    fc_scale = torch.randperm(128).float() + 1       # fc1 unit u: every weight = fc_scale[u]
    with torch.no_grad():
        model.conv1.weight.copy_(conv_scale.view(16, 1, 1, 1).expand_as(model.conv1.weight) / 100)
        model.conv2.weight.fill_(0.01)   # consumers read every channel alike, so they do not reorder them
        model.fc1.weight.copy_(fc_scale.view(128, 1).expand_as(model.fc1.weight) / 1000)
        model.fc2.weight.fill_(0.01)
    counts = {"conv1": 5, "fc1": 40}
    keep = kept_channels(model, x, counts, "l1")
    assert keep["conv1"] == sorted(torch.topk(conv_scale, 5).indices.tolist())
    assert keep["fc1"] == sorted(torch.topk(fc_scale, 40).indices.tolist())
    pruned = prune(model, x, counts, "l1")
    torch.testing.assert_close(pruned.conv1.weight, model.conv1.weight[keep["conv1"]])
    torch.testing.assert_close(pruned.fc1.bias, model.fc1.bias[keep["fc1"]])


def test_l1_and_l2_rank_differently_where_norms_disagree():
    """One big weight against many middling ones: L1 prefers the second, L2 the first."""
    model, x = lenet_and_input()
    with torch.no_grad():
        model.conv1.weight.fill_(0.01)
        model.conv1.weight[0].fill_(0.2)           # L1 5.0, L2^2 1.0
        model.conv1.weight[1, 0, 0, 0] = 1.5       # L1 ~1.7, L2^2 ~2.25
        model.conv2.weight.fill_(0.01)
    assert kept_channels(model, x, {"conv1": 1}, "l1")["conv1"] == [0]
    assert kept_channels(model, x, {"conv1": 1}, "l2")["conv1"] == [1]


def tiny_batches():
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    return TensorLoader(x, y, batch_size=8, shuffle=False)


@pytest.mark.parametrize("importance", sorted(IMPORTANCES))
def test_every_importance_prunes_to_exact_counts(importance):
    model, x = nm.create_model("lenet", conv1=6, conv2=8, fc1=16, fc2=12).eval(), torch.randn(2, 1, 28, 28)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    counts = {"conv1": 3, "conv2": 5, "fc1": 7, "fc2": 1}
    task, batches = nm.ClassificationTask(10), tiny_batches()
    pruned = prune(model, x, counts, importance, batches=batches, task=task)
    assert [pruned.conv1.out_channels, pruned.conv2.out_channels, pruned.fc1.out_features,
            pruned.fc2.out_features] == [3, 5, 7, 1]
    assert pruned(x).shape == (2, 10)
    # the model handed in is left alone: same weights, no gradients left on it
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    # every group is scored on the unpruned model: the order of the groups changes nothing
    reordered = dict(reversed(list(counts.items())))
    assert kept_channels(model, x, reordered, importance, batches, task) == \
        kept_channels(model, x, counts, importance, batches, task)


@pytest.mark.parametrize("importance", sorted(IMPORTANCES))
def test_scores_taken_once_rank_every_width_as_scoring_each_width_does(importance):
    """`neumeta compare` scores the base model once and prunes every width from those scores."""
    model, x = nm.create_model("lenet", conv1=6, conv2=8, fc1=16, fc2=12).eval(), torch.randn(2, 1, 28, 28)
    task, batches = nm.ClassificationTask(10), tiny_batches()
    scores = channel_scores(model, x, importance, batches, task, seed=3)
    for counts in ({"conv1": 3, "conv2": 5, "fc1": 7, "fc2": 1}, {"conv1": 6, "conv2": 1, "fc1": 16, "fc2": 6}):
        assert highest(scores, counts) == kept_channels(model, x, counts, importance, batches, task, seed=3)


def test_random_importance_is_reproducible_from_its_seed():
    model, x = lenet_and_input()
    counts = {"fc1": 64, "conv2": 16}
    first = kept_channels(model, x, counts, "random", seed=5)
    assert kept_channels(model, x, counts, "random", seed=5) == first
    assert kept_channels(model, x, counts, "random", seed=6) != first


def test_gradient_importances_see_the_data():
    """Taylor and Hessian scores come from the loss: other labels, other channels kept."""
    model, x = nm.create_model("lenet", fc1=32).eval(), torch.randn(2, 1, 28, 28)
    task = nm.ClassificationTask(10)
    inputs = torch.randn(16, 1, 28, 28)
    loaders = [TensorLoader(inputs, torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(s)),
                            batch_size=8, shuffle=False) for s in (1, 2)]
    for importance in ("taylor", "hessian"):
        kept = [kept_channels(model, x, {"fc1": 8}, importance, b, task)["fc1"] for b in loaders]
        assert kept[0] != kept[1], importance


def test_refusals_name_what_is_wrong():
    model, x = lenet_and_input()
    with pytest.raises(KeyError, match="'magnitude'.*l1"):
        prune(model, x, {"conv1": 4}, "magnitude")
    with pytest.raises(KeyError, match="'conv9'.*conv1"):
        prune(model, x, {"conv9": 4})
    with pytest.raises(ValueError, match="'conv1' has 16 channels; cannot keep 0"):
        prune(model, x, {"conv1": 0})
    with pytest.raises(ValueError, match="'conv1' has 16 channels; cannot keep 17"):
        prune(model, x, {"conv1": 17})
    with pytest.raises(ValueError, match="cannot keep 2.5"):
        prune(model, x, {"conv1": 2.5})
    for importance in ("taylor", "hessian"):
        with pytest.raises(ValueError, match=f"'{importance}' needs training batches and a task"):
            prune(model, x, {"conv1": 4}, importance)


def test_finetune_lowers_the_training_loss():
    model = prune(*lenet_and_input(), {"conv1": 8, "fc1": 32}, "l1")
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    loader = TensorLoader(x, y, batch_size=16, shuffle=True, seed=0)
    task = nm.ClassificationTask(10)
    data = Data(train=loader, val=loader, test=loader, task=task, example=x[:2])
    before_weights = model.conv1.weight.detach().clone()
    before = task.evaluate(model, [(x, y)])["loss"]
    assert finetune(model, data, steps=20, lr=1e-3, progress=False) is model
    assert not model.training
    assert not torch.equal(model.conv1.weight, before_weights)
    assert task.evaluate(model, [(x, y)])["loss"] < before
    unchanged = {k: v.clone() for k, v in model.state_dict().items()}
    finetune(model, data, steps=0, progress=False)
    assert all(torch.equal(unchanged[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="whole number >= 0"):
        finetune(model, data, steps=-1, progress=False)


def test_hessian_averages_squared_gradients_over_every_sample():
    """torch-pruning 1.6's accumulate_grad keeps only the last sample; ours keeps them all."""
    from neumeta.baselines.pruning import _squared_sample_gradients
    model = nm.create_model("lenet", conv1=4, conv2=4, fc1=8, fc2=8).eval()
    task = nm.ClassificationTask(10)
    x, y = torch.randn(6, 1, 28, 28), torch.randint(0, 10, (6,))
    expected = [torch.zeros_like(p) for p in model.parameters()]
    for i in range(6):
        grads = torch.autograd.grad(task.loss(model(x[i:i + 1]), (x[i:i + 1], y[i:i + 1])), list(model.parameters()))
        for e, g in zip(expected, grads):
            e += g.pow(2) / 6
    _squared_sample_gradients(model, TensorLoader(x, y, batch_size=4, shuffle=False), task)
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, e)
