"""Tests for neumeta.fold: folding BatchNorm keeps the function and removes every BN."""

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from neumeta.fold import fold_batchnorm

BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


# --- Models ---------------------------------------------------------------------------------

class PlainCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))


def mlp():
    return nn.Sequential(nn.Linear(12, 20), nn.BatchNorm1d(20), nn.ReLU(),
                         nn.Linear(20, 7), nn.BatchNorm1d(7))


def conv_without_bias():
    return nn.Sequential(nn.Conv2d(3, 6, 3, bias=False), nn.BatchNorm2d(6), nn.ReLU())


class ResidualBlock(nn.Module):
    """BN in both branches, joined by an add."""

    def __init__(self, cin=4, cout=8):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def depthwise():
    return nn.Sequential(nn.Conv2d(6, 6, 3, padding=1, groups=6), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Conv2d(6, 12, 3, groups=3), nn.BatchNorm2d(12))


def conv_transpose():
    return nn.Sequential(nn.ConvTranspose2d(4, 6, 3, stride=2), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.ConvTranspose2d(6, 9, 2, groups=3, bias=False), nn.BatchNorm2d(9))


def conv1d():
    return nn.Sequential(nn.Conv1d(3, 5, 3), nn.BatchNorm1d(5), nn.ReLU(),
                         nn.ConvTranspose1d(5, 4, 3), nn.BatchNorm1d(4))


def conv3d():
    return nn.Sequential(nn.Conv3d(2, 4, 3), nn.BatchNorm3d(4, affine=False))


MODELS = {
    "plain_cnn": (PlainCNN, (2, 3, 10, 10)),
    "mlp": (mlp, (8, 12)),
    "conv_without_bias": (conv_without_bias, (2, 3, 8, 8)),
    "residual": (ResidualBlock, (2, 4, 8, 8)),
    "depthwise": (depthwise, (2, 6, 8, 8)),
    "conv_transpose": (conv_transpose, (2, 4, 5, 5)),
    "conv1d": (conv1d, (2, 3, 16)),
    "conv3d": (conv3d, (2, 2, 5, 5, 5)),
}


def randomise_bn(model, seed=0):
    """Give every BN non-trivial statistics and affine parameters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, BN_TYPES):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen))
                m.running_var.copy_(torch.rand(n, generator=gen) * 2 + 0.2)
                if m.affine:
                    m.weight.copy_(torch.randn(n, generator=gen))
                    m.bias.copy_(torch.randn(n, generator=gen))
    return model


def build(key, seed=0):
    factory, shape = MODELS[key]
    torch.manual_seed(seed)
    model = randomise_bn(factory(), seed)
    return model, torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1))


def bn_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, BN_TYPES)]


def eval_out(model, x):
    with torch.no_grad():
        return model.eval()(x)


def max_diff(a, b):
    return (a - b).abs().max().item()


# --- Folding keeps the function ------------------------------------------------------------

@pytest.mark.parametrize("key", list(MODELS))
def test_fold_keeps_outputs_and_removes_bn(key):
    model, x = build(key)
    names = bn_names(model)
    assert names, "each test model has BatchNorm to fold"
    folded = fold_batchnorm(model)

    assert max_diff(eval_out(model, x), eval_out(folded, x)) <= 1e-5
    assert bn_names(folded) == []
    assert all(type(folded.get_submodule(n)) is nn.Identity for n in names)
    assert not folded.training
    # Every other module keeps its name and class.
    before = {n: type(m) for n, m in model.named_modules() if n not in names}
    after = {n: type(m) for n, m in folded.named_modules() if n not in names}
    assert before == after


def test_fold_after_train_mode_statistics():
    """Statistics gathered the usual way, by forward passes in train mode."""
    torch.manual_seed(3)
    model = ResidualBlock()
    model.train()
    with torch.no_grad():
        for _ in range(5):
            model(torch.randn(4, 4, 8, 8) * 3 + 1)
    assert not torch.allclose(model.bn1.running_var, torch.ones(8))
    x = torch.randn(2, 4, 8, 8)
    assert max_diff(eval_out(model, x), eval_out(fold_batchnorm(model), x)) <= 1e-5


def test_missing_bias_is_created():
    model, x = build("conv_without_bias")
    assert model[0].bias is None
    folded = fold_batchnorm(model)
    assert isinstance(folded[0].bias, nn.Parameter)
    assert "0.bias" in dict(folded.named_parameters())
    assert model[0].bias is None


def test_original_is_untouched():
    model, x = build("plain_cnn")
    model.train()
    state = copy.deepcopy(model.state_dict())
    reference = eval_out(copy.deepcopy(model), x)
    model.train()

    fold_batchnorm(model)

    assert model.training
    assert isinstance(model.bn1, nn.BatchNorm2d) and isinstance(model.bn2, nn.BatchNorm2d)
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert torch.equal(eval_out(model, x), reference)


@pytest.mark.parametrize("key", ["residual", "conv_transpose", "mlp"])
def test_folding_twice_changes_nothing(key):
    model, x = build(key)
    once = fold_batchnorm(model)
    twice = fold_batchnorm(once)
    assert twice is not once
    assert [(n, type(m)) for n, m in once.named_modules()] == \
        [(n, type(m)) for n, m in twice.named_modules()]
    s1, s2 = once.state_dict(), twice.state_dict()
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
    assert torch.equal(eval_out(once, x), eval_out(twice, x))


def test_model_without_bn_is_plain_eval_copy():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1)).train()
    folded = fold_batchnorm(model)
    assert folded is not model and model.training and not folded.training
    assert all(a is not b and torch.equal(a, b)
               for a, b in zip(model.parameters(), folded.parameters()))


def test_double_precision_model_stays_double():
    model, x = build("depthwise")
    model = model.double()
    folded = fold_batchnorm(model)
    assert all(p.dtype == torch.float64 for p in folded.parameters())
    assert max_diff(eval_out(model, x.double()), eval_out(folded, x.double())) <= 1e-12


def test_shared_conv_and_bn_called_twice_fold_once():
    """The same conv->BN pair applied twice is still one fold."""

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv(torch.relu(self.bn(self.conv(x)))))

    torch.manual_seed(0)
    model = randomise_bn(Twice())
    x = torch.randn(2, 4, 6, 6)
    folded = fold_batchnorm(model)
    assert isinstance(folded.bn, nn.Identity)
    assert max_diff(eval_out(model, x), eval_out(folded, x)) <= 1e-5


def test_bn_registered_under_two_names_is_replaced_at_both():
    class Aliased(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 4)
            self.bn = nn.BatchNorm1d(4)
            self.alias = self.bn  # same module under a second name, never called through it

        def forward(self, x):
            return self.bn(self.fc(x))

    model = randomise_bn(Aliased())
    folded = fold_batchnorm(model)
    assert isinstance(folded.bn, nn.Identity) and isinstance(folded.alias, nn.Identity)
    x = torch.randn(5, 3)
    assert max_diff(eval_out(model, x), eval_out(folded, x)) <= 1e-5


def test_shape_query_on_layer_output_does_not_block_folding():
    """Reading only a shape does not depend on values, which folding changes."""

    class ShapeQuery(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y).view(y.shape[0], y.size(1), -1)

    model = randomise_bn(ShapeQuery())
    x = torch.randn(2, 3, 6, 6)
    folded = fold_batchnorm(model)
    assert isinstance(folded.bn, nn.Identity)
    assert max_diff(eval_out(model, x), eval_out(folded, x)) <= 1e-5


# --- Seeded sweeps over shapes --------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(
    groups=st.integers(1, 3),
    in_per_group=st.integers(1, 3),
    out_per_group=st.integers(1, 4),
    kernel=st.integers(1, 4),
    transposed=st.booleans(),
    bias=st.booleans(),
    dims=st.sampled_from([1, 2, 3]),
    seed=st.integers(0, 2**16),
)
def test_fold_sweep_conv_shapes(groups, in_per_group, out_per_group, kernel, transposed,
                                bias, dims, seed):
    cin, cout = groups * in_per_group, groups * out_per_group
    conv_cls = {(1, False): nn.Conv1d, (2, False): nn.Conv2d, (3, False): nn.Conv3d,
                (1, True): nn.ConvTranspose1d, (2, True): nn.ConvTranspose2d,
                (3, True): nn.ConvTranspose3d}[dims, transposed]
    bn_cls = BN_TYPES[dims - 1]
    torch.manual_seed(seed)
    model = randomise_bn(nn.Sequential(conv_cls(cin, cout, kernel, groups=groups, bias=bias),
                                       bn_cls(cout)), seed)
    x = torch.randn(2, cin, *[kernel + 3] * dims)

    folded = fold_batchnorm(model)

    assert isinstance(folded[1], nn.Identity)
    assert max_diff(eval_out(model, x), eval_out(folded, x)) <= 1e-5


@pytest.mark.parametrize("seed", range(10))
def test_fold_sweep_linear_widths(seed):
    gen = torch.Generator().manual_seed(seed)
    widths = torch.randint(1, 33, (3,), generator=gen).tolist()
    torch.manual_seed(seed)
    model = randomise_bn(nn.Sequential(
        nn.Linear(widths[0], widths[1]), nn.BatchNorm1d(widths[1]), nn.ReLU(),
        nn.Linear(widths[1], widths[2], bias=seed % 2 == 0), nn.BatchNorm1d(widths[2])), seed)
    x = torch.randn(4, widths[0], generator=gen)
    assert max_diff(eval_out(model, x), eval_out(fold_batchnorm(model), x)) <= 1e-5


# --- BatchNorm that cannot be folded --------------------------------------------------------

class BNAfterAdd(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.post_add_bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.post_add_bn(self.conv(x) + x)


class ReluModuleThenBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.act = nn.ReLU()
        self.bn_after_relu = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn_after_relu(self.act(self.conv(x)))


class FunctionalReluThenBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn_after_f_relu = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn_after_f_relu(F.relu(self.conv(x)))


class ConvOutputReused(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.reused_bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.reused_bn(y) + y


class BNAfterPool(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.pool = nn.MaxPool2d(2)
        self.bn_after_pool = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn_after_pool(self.pool(self.conv(x)))


class OneBNTwoConvs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_a = nn.Conv2d(3, 4, 3, padding=1)
        self.conv_b = nn.Conv2d(3, 4, 3, padding=1)
        self.shared_bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.shared_bn(self.conv_a(x)) + self.shared_bn(self.conv_b(x))


class ConvOutputReturned(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.returned_bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.returned_bn(y), y


class StandardisedConv(nn.Conv2d):
    """Uses a transformed weight in forward, so scaling its weight would not scale its output."""

    def forward(self, x):
        w = (self.weight - self.weight.mean()) / (self.weight.std() + 1e-5)
        return F.conv2d(x, w, self.bias)


class SubclassConvThenBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = StandardisedConv(3, 4, 3)
        self.bn_after_subclass = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn_after_subclass(self.conv(x))


UNFOLDABLE = [
    (BNAfterAdd, "post_add_bn"),
    (ReluModuleThenBN, "bn_after_relu"),
    (FunctionalReluThenBN, "bn_after_f_relu"),
    (ConvOutputReused, "reused_bn"),
    (BNAfterPool, "bn_after_pool"),
    (OneBNTwoConvs, "shared_bn"),
    (ConvOutputReturned, "returned_bn"),
    (SubclassConvThenBN, "bn_after_subclass"),
]


@pytest.mark.parametrize("factory, bn_name", UNFOLDABLE)
def test_unfoldable_bn_raises_naming_it(factory, bn_name):
    model = factory()
    with pytest.raises(ValueError, match=f"'{bn_name}'"):
        fold_batchnorm(model)
    assert isinstance(model.get_submodule(bn_name), nn.BatchNorm2d)


def test_bn_without_running_stats_raises_naming_it():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.raises(ValueError, match="'1'.*running statistics"):
        fold_batchnorm(model)


def test_bn_feature_count_mismatch_raises():
    """A BN whose width differs from the layer's outputs is not that layer's BN."""
    model = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(5))
    with pytest.raises(ValueError, match="'1'.*5 features"):
        fold_batchnorm(model)


# --- Models fx cannot trace: the example_inputs fallback ------------------------------------

class DataDependent(nn.Module):
    """Python control flow on tensor values defeats symbolic tracing."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.head = nn.Sequential(nn.Conv2d(6, 6, 3, groups=2), nn.BatchNorm2d(6))

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        if y.sum() > -1e9:  # always true, but fx cannot know
            y = y * 2
        return self.head(y) + y[:, :, 1:-1, 1:-1]


class DataDependentReused(DataDependent):
    def forward(self, x):
        y = self.conv(x)
        if y.sum() > -1e9:
            y = self.bn(y) + y  # conv output read by an add as well as by bn
        return y


class DataDependentAfterAdd(DataDependent):
    def forward(self, x):
        y = self.conv(x)
        if y.sum() > -1e9:
            y = y + 1
        return self.bn(y)


def test_untraceable_without_example_inputs_raises():
    with pytest.raises(TypeError, match="example_inputs"):
        fold_batchnorm(DataDependent())


def test_untraceable_with_example_inputs_folds():
    torch.manual_seed(0)
    model = randomise_bn(DataDependent())
    x = torch.randn(2, 3, 8, 8)
    folded = fold_batchnorm(model, example_inputs=x)
    assert bn_names(folded) == []
    assert isinstance(folded.bn, nn.Identity) and isinstance(folded.head[1], nn.Identity)
    assert max_diff(eval_out(model, x), eval_out(folded, x)) <= 1e-5
    assert isinstance(model.bn, nn.BatchNorm2d)


@pytest.mark.parametrize("factory", [DataDependentReused, DataDependentAfterAdd])
def test_untraceable_unfoldable_raises_naming_bn(factory):
    with pytest.raises(ValueError, match="'bn'"):
        fold_batchnorm(factory(), example_inputs=(torch.randn(2, 3, 8, 8),))


def test_hook_fallback_sees_layer_output_returned_from_model():
    class ReturnsBoth(DataDependent):
        def forward(self, x):
            y = self.conv(x)
            if y.sum() > -1e9:
                pass
            return self.bn(y), y

    with pytest.raises(ValueError, match="'bn'.*model output"):
        fold_batchnorm(ReturnsBoth(), example_inputs=torch.randn(1, 3, 5, 5))


# --- An error in forward is the model's, not a tracing problem --------------------------------

class RaisesInForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        raise RuntimeError("bug in forward")


class ShapeErrorAfterControlFlow(DataDependent):
    """Not fx-traceable, and the eager run then fails on a shape mismatch of its own."""

    def forward(self, x):
        y = self.bn(self.conv(x))
        if y.sum() > -1e9:
            y = y @ torch.ones(5, 5)  # y is [n, 6, 8, 8]: the last axis has 8, not 5
        return y


@pytest.mark.parametrize("example", [None, torch.randn(1, 3, 5, 5)])
def test_error_raised_by_forward_propagates(example):
    with pytest.raises(RuntimeError, match="bug in forward"):
        fold_batchnorm(RaisesInForward(), example_inputs=example)


def test_shape_error_in_the_eager_fallback_propagates():
    with pytest.raises(RuntimeError, match="cannot be multiplied|size mismatch|shape"):
        fold_batchnorm(ShapeErrorAfterControlFlow(), example_inputs=torch.randn(2, 3, 8, 8))


class LoopOverBatch(nn.Module):
    """``range`` over a traced size is refused by Python, not by fx: still a tracing failure."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        for _ in range(x.shape[0]):
            y = torch.tanh(y)
        return y


@pytest.mark.parametrize("factory", [DataDependent, LoopOverBatch])
def test_untraceable_control_flow_falls_back_and_folds(factory):
    torch.manual_seed(1)
    model, x = randomise_bn(factory()), torch.randn(2, 3, 8, 8)
    with pytest.raises(TypeError, match="example_inputs"):
        fold_batchnorm(model)
    folded = fold_batchnorm(model, example_inputs=x)
    assert bn_names(folded) == []
    assert max_diff(eval_out(model, x), eval_out(folded, x)) <= 1e-5
