"""Tests for neumeta.smooth: the permuted network computes the same function, total variation
never rises (and does fall on random weights), the report adds up, axis alignment holds, and
TV matches a hand computation. Models are drawn at random from small families that cover the
coupling patterns: plain chains, shared residual streams, concatenation skips, flatten,
depthwise and transposed convolutions, per-channel norms."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from neumeta.models import create_model, list_models
from neumeta.models import example_input as registry_example_input
from neumeta.smooth import smooth, total_variation

"""Input shape (without batch) of every registered model; a new model must be added here."""


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small models run fastest on one thread, and a busy shared CPU makes two threads crawl."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def example_input(name):
    return registry_example_input(name)


# ---------------------------------------------------------------------------------------------
# Model families
# ---------------------------------------------------------------------------------------------

def randomise_norms(model):
    """Random affine parameters and running statistics, as if trained; then eval mode."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)) and m.weight is not None:
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 1.5)
            if isinstance(m, nn.PReLU):
                m.weight.uniform_(0.0, 0.5)
    return model.eval()


def _norm(bn, c):
    return nn.BatchNorm2d(c) if bn else nn.Identity()


class PlainCNN(nn.Module):
    def __init__(self, widths, bn, kernel=3):
        super().__init__()
        chans = [3] + list(widths)
        self.convs = nn.ModuleList(nn.Conv2d(a, b, kernel, padding=kernel // 2, bias=not bn)
                                   for a, b in zip(chans, chans[1:]))
        self.norms = nn.ModuleList(_norm(bn, c) for c in widths)
        self.head = nn.Linear(widths[-1], 5)

    def forward(self, x):
        for conv, norm in zip(self.convs, self.norms):
            x = F.relu(norm(conv(x)))
        return self.head(x.mean((2, 3)))


class Residual(nn.Module):
    """A stem and two blocks add into one stream; a projection block opens a second stream."""

    def __init__(self, width, hidden, wider, bn):
        super().__init__()
        self.stem, self.stem_n = nn.Conv2d(3, width, 3, padding=1), _norm(bn, width)
        self.a1, self.a1n = nn.Conv2d(width, hidden, 3, padding=1), _norm(bn, hidden)
        self.a2, self.a2n = nn.Conv2d(hidden, width, 3, padding=1), _norm(bn, width)
        self.b1, self.b1n = nn.Conv2d(width, hidden, 1), _norm(bn, hidden)
        self.b2, self.b2n = nn.Conv2d(hidden, width, 3, padding=1), _norm(bn, width)
        self.c1, self.c1n = nn.Conv2d(width, wider, 3, stride=2, padding=1), _norm(bn, wider)
        self.c2, self.c2n = nn.Conv2d(wider, wider, 3, padding=1), _norm(bn, wider)
        self.proj, self.proj_n = nn.Conv2d(width, wider, 1, stride=2), _norm(bn, wider)
        self.head = nn.Linear(wider, 4)

    def forward(self, x):
        x = F.relu(self.stem_n(self.stem(x)))
        x = F.relu(x + self.a2n(self.a2(F.relu(self.a1n(self.a1(x))))))
        x = F.relu(x + self.b2n(self.b2(F.relu(self.b1n(self.b1(x))))))
        y = self.c2n(self.c2(F.relu(self.c1n(self.c1(x)))))
        x = F.relu(y + self.proj_n(self.proj(x)))
        return self.head(x.mean((2, 3)))


class Concat(nn.Module):
    """Two branches concatenated; optionally a depthwise conv on the concatenation, which puts
    both branches' channels into one group that they cannot swap between."""

    def __init__(self, wa, wb, out, depthwise, bn):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.a, self.an = nn.Conv2d(6, wa, 3, padding=1), _norm(bn, wa)
        self.b, self.bn_b = nn.Conv2d(6, wb, 1), _norm(bn, wb)
        self.dw = nn.Conv2d(wa + wb, wa + wb, 3, padding=1, groups=wa + wb) if depthwise else None
        self.c = nn.Conv2d(wa + wb, out, 3, padding=1)
        self.head = nn.Linear(out, 3)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = torch.cat([F.relu(self.an(self.a(x))), F.relu(self.bn_b(self.b(x)))], dim=1)
        if self.dw is not None:
            x = F.relu(self.dw(x))
        return self.head(F.relu(self.c(x)).mean((2, 3)))


class MLP(nn.Module):
    def __init__(self, widths, norm):
        super().__init__()
        chans = [10] + list(widths)
        self.fcs = nn.ModuleList(nn.Linear(a, b) for a, b in zip(chans, chans[1:]))
        make = {"none": lambda c: nn.ReLU(), "layernorm": nn.LayerNorm,
                "prelu": nn.PReLU}[norm]
        self.acts = nn.ModuleList(make(c) for c in widths)
        self.head = nn.Linear(widths[-1], 4)

    def forward(self, x):
        for fc, act in zip(self.fcs, self.acts):
            x = torch.tanh(act(fc(x)))
        return self.head(x)


class CNNFlatten(nn.Module):
    def __init__(self, c1, c2, hidden, bn):
        super().__init__()
        self.conv1, self.n1 = nn.Conv2d(3, c1, 3), _norm(bn, c1)
        self.conv2, self.n2 = nn.Conv2d(c1, c2, 3), _norm(bn, c2)
        self.fc1 = nn.Linear(c2 * 2 * 2, hidden)
        self.fc2 = nn.Linear(hidden, 3)

    def forward(self, x):  # 12x12 -> 10 -> 5 -> 3 -> 2 (ceil mode keeps the last row)
        x = F.max_pool2d(F.relu(self.n1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.n2(self.conv2(x))), 2, ceil_mode=True)
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


class Depthwise(nn.Module):
    """MobileNet-style inverted residual: expand 1x1, depthwise 3x3, project 1x1, add."""

    def __init__(self, width, expand, bn):
        super().__init__()
        hidden = width * expand
        self.stem, self.stem_n = nn.Conv2d(3, width, 3, padding=1), _norm(bn, width)
        self.expand, self.en = nn.Conv2d(width, hidden, 1), _norm(bn, hidden)
        self.dw, self.dwn = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden), _norm(bn, hidden)
        self.project, self.pn = nn.Conv2d(hidden, width, 1), _norm(bn, width)
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        x = F.relu(self.stem_n(self.stem(x)))
        y = F.relu(self.dwn(self.dw(F.relu(self.en(self.expand(x))))))
        x = x + self.pn(self.project(y))
        return self.head(x.mean((2, 3)))


class Transposed(nn.Module):
    """Conv, transposed conv with GroupNorm, transposed depthwise conv, conv: a tiny decoder."""

    def __init__(self, c1, per_group, norm_groups):
        super().__init__()
        c2 = per_group * norm_groups
        self.conv, self.act = nn.Conv2d(3, c1, 3, stride=2, padding=1), nn.PReLU(c1)
        self.up = nn.ConvTranspose2d(c1, c2, 4, stride=2, padding=1)
        self.gn = nn.GroupNorm(norm_groups, c2)
        self.dwt = nn.ConvTranspose2d(c2, c2, 3, padding=1, groups=c2)
        self.out = nn.Conv2d(c2, 2, 3, padding=1)

    def forward(self, x):
        x = self.act(self.conv(x))
        return self.out(torch.tanh(self.dwt(F.relu(self.gn(self.up(x))))))


widths = st.integers(2, 9)

FAMILIES = {
    "plain": (st.tuples(st.lists(widths, min_size=1, max_size=3), st.booleans(),
                        st.sampled_from([1, 3])), lambda a: PlainCNN(*a), (3, 8, 8)),
    "residual": (st.tuples(widths, widths, widths, st.booleans()),
                 lambda a: Residual(*a), (3, 8, 8)),
    "concat": (st.tuples(widths, widths, widths, st.booleans(), st.booleans()),
               lambda a: Concat(*a), (3, 6, 6)),
    "mlp": (st.tuples(st.lists(widths, min_size=1, max_size=3),
                      st.sampled_from(["none", "layernorm", "prelu"])), lambda a: MLP(*a), (10,)),
    "flatten": (st.tuples(widths, widths, widths, st.booleans()),
                lambda a: CNNFlatten(*a), (3, 12, 12)),
    "depthwise": (st.tuples(widths, st.integers(1, 3), st.booleans()),
                  lambda a: Depthwise(*a), (3, 6, 6)),
    "transposed": (st.tuples(widths, st.integers(1, 4), st.integers(1, 3)),
                   lambda a: Transposed(*a), (3, 8, 8)),
}


def build(family, args, seed):
    torch.manual_seed(seed)
    _, make, shape = FAMILIES[family]
    return randomise_norms(make(args)), torch.randn(3, *shape)


# ---------------------------------------------------------------------------------------------
# The property every model must have
# ---------------------------------------------------------------------------------------------

def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_smooth_is_safe(model, x, seed=0):
    """Same function (eval), TV never rises, report adds up, input model untouched."""
    before = state(model)
    with torch.no_grad():
        y0 = model(x)
    smoothed, report = smooth(model, x, seed=seed)
    with torch.no_grad():
        y1 = smoothed(x)
    if isinstance(y0, tuple):  # several outputs (a VAE's reconstruction, mu, logvar)
        y0, y1 = torch.cat([t.flatten(1) for t in y0], 1), torch.cat([t.flatten(1) for t in y1], 1)
    scale = float(y0.abs().max())
    assert float((y1 - y0).abs().max()) <= 1e-5 * max(scale, 1e-12)
    assert report.tv_after <= report.tv_before + 1e-6
    for name, g in report.groups.items():
        assert g.tv_after <= g.tv_before + 1e-6, name
        assert sorted(g.order) == list(range(g.channels)), name
    assert sum(g.tv_before for g in report.groups.values()) == pytest.approx(report.tv_before)
    assert sum(g.tv_after for g in report.groups.values()) == pytest.approx(report.tv_after)
    after = state(model)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before), "smooth modified its input"
    measured = total_variation(smoothed, x)
    assert measured.total == pytest.approx(report.tv_after, rel=1e-9)
    for name, g in report.groups.items():
        assert measured.groups[name] == pytest.approx(g.tv_after, rel=1e-9, abs=1e-12)
    return smoothed, report


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_smooth_keeps_function_and_never_raises_tv(family):
    @settings(max_examples=10, deadline=None, derandomize=True)
    @given(args=FAMILIES[family][0], seed=st.integers(0, 2**16))
    def check(args, seed):
        model, x = build(family, args, seed)
        assert_smooth_is_safe(model, x, seed=seed % 3)

    check()


# ImageNet-scale models at test size: smoothing cost grows with channels^2 (full resnet50: ~64 s).
TEST_KWARGS = {"resnet18": dict(base=16), "resnet50": dict(base=8), "unet_r18": dict(base=16, decoder_base=4)}


@pytest.mark.parametrize("name", list_models())
def test_registered_models(name):
    model = randomise_norms(create_model(name, **TEST_KWARGS.get(name, {})))
    _, report = assert_smooth_is_safe(model, example_input(name))
    assert report.tv_after < report.tv_before


def test_unknown_model_has_no_example_input():
    with pytest.raises(KeyError, match="no-such-model"):
        example_input("no-such-model")


# ---------------------------------------------------------------------------------------------
# It really smooths, and in a defined direction
# ---------------------------------------------------------------------------------------------

def test_tv_falls_on_most_groups_of_a_random_network():
    model, x = build("residual", (12, 10, 16, True), seed=1)
    _, report = smooth(model, x)
    fell = [n for n, g in report.groups.items() if g.tv_after < g.tv_before * (1 - 1e-6)]
    assert len(fell) >= 0.75 * len(report.groups), report.table()
    assert report.tv_after < 0.99 * report.tv_before
    assert any(g.order != tuple(range(g.channels)) for g in report.groups.values())


def chain_features(layers, norms, nxt):
    """Per-channel feature vectors of a conv/linear chain, written out by hand: the layer's
    weight rows and bias, its BatchNorm's four vectors, and the next layer's columns (all the
    columns a channel owns after a flatten: fc.weight viewed as [out, C, H*W])."""
    feats = []
    for layer, norm, following in zip(layers, norms, nxt):
        c = layer.weight.shape[0]
        parts = [layer.weight.reshape(c, -1)]
        if layer.bias is not None:
            parts.append(layer.bias[:, None])
        if isinstance(norm, nn.BatchNorm2d):
            parts += [t[:, None] for t in (norm.weight, norm.bias, norm.running_mean, norm.running_var)]
        w = following.weight
        parts.append(w.reshape(w.shape[0], c, -1).transpose(0, 1).reshape(c, -1))
        feats.append(torch.cat(parts, 1).detach().double())
    return feats


def test_axis_alignment_and_order_semantics_on_a_chain():
    model, x = build("plain", ([9, 12, 7], True, 3), seed=4)
    smoothed, report = smooth(model, x)
    layers = [list(m.convs) for m in (model, smoothed)]
    norms = [list(m.norms) for m in (model, smoothed)]
    nxt = [layers[i][1:] + [m.head] for i, m in enumerate((model, smoothed))]
    old = chain_features(layers[0], norms[0], nxt[0])
    new = chain_features(layers[1], norms[1], nxt[1])
    previous = list(range(3))
    for i, (f_old, f_new) in enumerate(zip(old, new)):
        order = list(report.groups[f"convs.{i}"].order)
        # channel order[k] moved to position k, on both axes of every weight
        assert torch.equal(layers[1][i].weight, layers[0][i].weight[order][:, previous])
        assert torch.equal(norms[1][i].running_var, norms[0][i].running_var[order])
        previous = order
        # the other groups' permutations leave each channel's norm and distances alone
        norm = f_new.norm(dim=1)
        assert torch.allclose(norm, f_old[order].norm(dim=1))
        assert torch.allclose(torch.cdist(f_new, f_new, p=1), torch.cdist(f_old, f_old, p=1)[order][:, order])
        assert norm[0] <= norm[-1]
        tv = float((f_new[1:] - f_new[:-1]).abs().sum())   # TV by hand
        assert tv == pytest.approx(report.groups[f"convs.{i}"].tv_after, rel=1e-9)


def test_lenet_tv_by_hand_counts_every_flattened_column():
    model = create_model("lenet")
    x = example_input("lenet")
    tv = total_variation(model, x)
    layers = [model.conv1, model.conv2, model.fc1, model.fc2]
    feats = chain_features(layers, [None] * 4, layers[1:] + [model.fc3])
    by_hand = {n: float((f[1:] - f[:-1]).abs().sum())
               for n, f in zip(["conv1", "conv2", "fc1", "fc2"], feats)}
    assert tv.groups.keys() == by_hand.keys()
    for name in by_hand:
        assert tv.groups[name] == pytest.approx(by_hand[name], rel=1e-12)
    assert tv.total == pytest.approx(sum(by_hand.values()), rel=1e-12)
    smoothed, report = smooth(model, x)
    feats = chain_features([smoothed.conv1, smoothed.conv2, smoothed.fc1, smoothed.fc2], [None] * 4,
                           [smoothed.conv2, smoothed.fc1, smoothed.fc2, smoothed.fc3])
    for f in feats:
        assert f[0].norm() <= f[-1].norm()


def test_concatenation_gives_each_part_its_own_producers_order():
    model, x = build("concat", (5, 4, 6, False, False), seed=2)
    smoothed, report = smooth(model, x)
    a, b, c = (list(report.groups[n].order) for n in "abc")
    assert torch.equal(smoothed.c.weight[:, :5], model.c.weight[c][:, a])
    assert torch.equal(smoothed.c.weight[:, 5:], model.c.weight[c][:, [5 + i for i in b]])


def test_depthwise_on_a_concatenation_keeps_each_part_in_place():
    model, x = build("concat", (5, 4, 6, True, True), seed=3)
    _, report = assert_smooth_is_safe(model, x)
    (name, group), = [(n, g) for n, g in report.groups.items() if g.channels == 9]
    assert sorted(group.order[:5]) == list(range(5)) and sorted(group.order[5:]) == list(range(5, 9))


def test_groupnorm_channels_stay_in_their_norm_group():
    model, x = build("transposed", (6, 4, 3), seed=5)
    _, report = assert_smooth_is_safe(model, x)
    (order,) = [g.order for g in report.groups.values() if g.channels == 12]  # up, gn, dwt
    assert all(old // 4 == new // 4 for new, old in enumerate(order))


# ---------------------------------------------------------------------------------------------
# Options, determinism, errors
# ---------------------------------------------------------------------------------------------

def test_deterministic_for_a_seed():
    model, x = build("residual", (8, 6, 10, True), seed=6)
    s1, r1 = smooth(model, x, seed=7)
    s2, r2 = smooth(model, x, seed=7)
    assert {n: g.order for n, g in r1.groups.items()} == {n: g.order for n, g in r2.groups.items()}
    assert all(torch.equal(a, b) for a, b in zip(state(s1).values(), state(s2).values()))


def test_training_mode_model_is_left_alone_and_copy_keeps_its_mode():
    model, x = build("plain", ([6, 5], True, 3), seed=8)
    model.train()
    before = state(model)
    smoothed, _ = smooth(model, x)
    assert smoothed.training and model.training
    assert all(torch.equal(v, before[k]) for k, v in state(model).items())
    assert all(p.requires_grad for p in smoothed.parameters())


def test_groups_restricts_what_is_permuted():
    model, x = build("plain", ([6, 7, 8], False, 3), seed=9)
    smoothed, report = smooth(model, x, groups=["convs.1"])
    assert list(report.groups) == ["convs.1"]
    assert torch.equal(smoothed.convs[0].weight, model.convs[0].weight)
    assert torch.equal(smoothed.convs[2].bias, model.convs[2].bias)
    assert set(total_variation(model, x, groups=["convs.1"]).groups) == {"convs.1"}
    with pytest.raises(KeyError, match="convs.0"):
        smooth(model, x, groups=["nope"])


def test_time_limit_still_gives_a_valid_result():
    model, x = build("residual", (8, 6, 10, True), seed=10)
    _, report = smooth(model, x, time_limit=0.0)
    assert report.tv_after <= report.tv_before + 1e-6


def test_report_table_lists_groups_and_totals():
    model, x = build("plain", ([4, 5], False, 3), seed=11)
    _, report = smooth(model, x)
    table = report.table()
    assert "convs.0" in table and "convs.1" in table and "total" in table
    assert report.seconds > 0


class InputResidual(nn.Module):
    """Adds a conv's output to the raw input: torch-pruning does not see the input as coupled."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 3, 3, padding=1)
        self.head = nn.Conv2d(3, 2, 1)

    def forward(self, x):
        return self.head(x + self.c(x))


def test_untraced_coupling_is_caught_by_the_output_check():
    model, x = InputResidual(), torch.randn(2, 3, 5, 5)
    with pytest.raises(ValueError, match="'c'"):
        smooth(model, x)
    smooth(model, x, check=False)  # the user's call


class GroupedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3, padding=1)
        self.g = nn.Conv2d(4, 6, 3, padding=1, groups=2)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.head(self.g(self.c(x)))


class SpatialLayerNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3, padding=1)
        self.ln = nn.LayerNorm([4, 5, 5])
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.ln(self.c(x)))


@pytest.mark.parametrize("model, culprit", [(GroupedConv(), "'g'"), (SpatialLayerNorm(), "'ln'")])
def test_unsupported_channel_ties_raise_naming_the_module(model, culprit):
    with pytest.raises(ValueError, match=culprit):
        smooth(model, torch.randn(1, 3, 5, 5))


def test_solver_beats_identity_and_random_orders_on_real_groups():
    """On LeNet's real channel groups (all coupled tensors, flatten included) the smoothing order
    has lower TV than the identity order and than each of 20 random orders."""
    import numpy as np
    from neumeta.smooth import _group_tv, _trace

    torch.manual_seed(0)
    model = create_model("lenet")
    x = torch.randn(2, 1, 28, 28)
    _, report = smooth(model, x)
    rng = np.random.default_rng(0)
    for group in _trace(model, x, None):
        solved = report.groups[group.name].tv_after
        identity = _group_tv(group, np.arange(group.size))
        random_best = min(_group_tv(group, rng.permutation(group.size)) for _ in range(20))
        assert solved < identity and solved < random_best, (group.name, solved, identity, random_best)
