"""Models the library has never seen (defined here, not in the registry) morph too.

Each test model names its modules after its constructor's width arguments, so the channel
groups WidthSpace finds (named after their first producer) can be handed back to the
constructor: an independent check that a sampled network is that architecture at that width.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import neumeta as nm
from neumeta.flops import count_flops

TINY_INR = nm.INRConfig(hidden=16, depth=3, frequencies=2)
WIDTHS = [1.0, 0.75, 0.5, 0.25, "random"]


class MLP(nn.Module):
    def __init__(self, fc1=48, fc2=32):
        super().__init__()
        self.fc1, self.bn1 = nn.Linear(64, fc1), nn.BatchNorm1d(fc1)
        self.fc2 = nn.Linear(fc1, fc2)
        self.out = nn.Linear(fc2, 5)

    def forward(self, x):
        x = F.relu(self.bn1(self.fc1(x.flatten(1))))
        return self.out(F.relu(self.fc2(x)))


class VGG(nn.Module):
    def __init__(self, conv1=8, conv2=12, conv3=16, conv4=16, fc=24):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, conv1, 3, padding=1), nn.BatchNorm2d(conv1)
        self.conv2, self.bn2 = nn.Conv2d(conv1, conv2, 3, padding=1), nn.BatchNorm2d(conv2)
        self.conv3, self.bn3 = nn.Conv2d(conv2, conv3, 3, padding=1), nn.BatchNorm2d(conv3)
        self.conv4, self.bn4 = nn.Conv2d(conv3, conv4, 3, padding=1), nn.BatchNorm2d(conv4)
        self.fc = nn.Linear(conv4 * 2 * 2, fc)  # a flatten: each channel is 4 inputs
        self.classifier = nn.Linear(fc, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))), 2)
        x = F.max_pool2d(F.relu(self.bn4(self.conv4(F.relu(self.bn3(self.conv3(x)))))), 2)
        return self.classifier(F.relu(self.fc(x.flatten(1))))


class ResidualMLP(nn.Module):
    """A residual stream (``stem``) shared by the input projection and both blocks' outputs."""

    def __init__(self, stem=32, block1_fc1=40, block2_fc1=24):
        super().__init__()
        self.stem = nn.Linear(20, stem)
        self.block1_fc1, self.block1_fc2 = nn.Linear(stem, block1_fc1), nn.Linear(block1_fc1, stem)
        self.block2_fc1, self.block2_fc2 = nn.Linear(stem, block2_fc1), nn.Linear(block2_fc1, stem)
        self.head = nn.Linear(stem, 3)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.block1_fc2(F.relu(self.block1_fc1(x)))
        x = x + self.block2_fc2(F.relu(self.block2_fc1(x)))
        return self.head(F.relu(x))


class ConcatCNN(nn.Module):
    """A DenseNet-style skip: ``conv_c`` reads ``cat([a, b])``, two groups in one input axis."""

    def __init__(self, conv_a=8, conv_b=6, conv_c=10):
        super().__init__()
        self.conv_a, self.bn_a = nn.Conv2d(3, conv_a, 3, padding=1), nn.BatchNorm2d(conv_a)
        self.conv_b, self.bn_b = nn.Conv2d(conv_a, conv_b, 3, padding=1), nn.BatchNorm2d(conv_b)
        self.conv_c = nn.Conv2d(conv_a + conv_b, conv_c, 1)
        self.fc = nn.Linear(conv_c, 4)

    def forward(self, x):
        a = F.relu(self.bn_a(self.conv_a(x)))
        b = F.relu(self.bn_b(self.conv_b(a)))
        c = F.relu(self.conv_c(torch.cat([a, b], dim=1)))
        return self.fc(F.adaptive_avg_pool2d(c, 1).flatten(1))


class DepthwiseCNN(nn.Module):
    """A MobileNetV2-style inverted residual: 1x1 expand, 3x3 depthwise, 1x1 project, skip."""

    def __init__(self, stem=8, expand=24, head=16):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, stem, 3, padding=1), nn.BatchNorm2d(stem)
        self.expand, self.bn1 = nn.Conv2d(stem, expand, 1), nn.BatchNorm2d(expand)
        self.dw, self.bn2 = nn.Conv2d(expand, expand, 3, padding=1, groups=expand), nn.BatchNorm2d(expand)
        self.project, self.bn3 = nn.Conv2d(expand, stem, 1), nn.BatchNorm2d(stem)
        self.head = nn.Conv2d(stem, head, 1)
        self.fc = nn.Linear(head, 6)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        y = F.relu6(self.bn1(self.expand(x)))
        y = F.relu6(self.bn2(self.dw(y)))
        x = x + self.bn3(self.project(y))
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.head(x)), 1).flatten(1))


class Conv1dNet(nn.Module):
    def __init__(self, conv1=8, conv2=12):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv1d(2, conv1, 5, padding=2), nn.BatchNorm1d(conv1)
        self.conv2 = nn.Conv1d(conv1, conv2, 3, padding=1)
        self.fc = nn.Linear(conv2, 3)

    def forward(self, x):
        x = F.relu(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return self.fc(x.mean(-1))


MODELS = {  # class, example input shape (batch of 4), groups the dependency graph must find
    "mlp": (MLP, (4, 1, 8, 8), {"fc1", "fc2"}),
    "vgg": (VGG, (4, 3, 8, 8), {"conv1", "conv2", "conv3", "conv4", "fc"}),
    "residual_mlp": (ResidualMLP, (4, 20), {"stem", "block1_fc1", "block2_fc1"}),
    "concat_cnn": (ConcatCNN, (4, 3, 8, 8), {"conv_a", "conv_b", "conv_c"}),
    "depthwise_cnn": (DepthwiseCNN, (4, 3, 8, 8), {"stem", "expand", "head"}),
    "conv1d": (Conv1dNet, (4, 2, 16), {"conv1", "conv2"}),
}


def n_params(m):
    return sum(p.numel() for p in m.parameters())


@pytest.fixture(scope="module", params=sorted(MODELS))
def chain(request):
    cls, shape, groups = MODELS[request.param]
    torch.manual_seed(0)
    model = cls()
    model.train()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for _ in range(3):
            model(torch.randn(shape) * 2 + 0.5)
    model.eval()
    x = torch.randn(shape)
    smoothed, _ = nm.smooth(nm.fold_batchnorm(model), x)  # smooth checks the function is unchanged
    space = nm.WidthSpace(smoothed, x)
    assert set(space.full) == groups  # every internal group, never inputs or outputs
    return cls, model, x, nm.WeightManifold(space, TINY_INR)


@pytest.mark.parametrize("width", WIDTHS)
def test_sampled_network_is_the_model_at_that_width(chain, width):
    cls, model, x, manifold = chain
    space = manifold.space
    if width == "random":
        rng = torch.Generator().manual_seed(1)
        width = {g: int(torch.randint(1, size + 1, (1,), generator=rng)) for g, size in space.full.items()}
    small = manifold.sample(width, samples=1)
    counts = space.resolve(width)
    out = small(x)
    assert out.shape == model(x).shape and torch.isfinite(out).all()
    rebuilt = nm.fold_batchnorm(cls(**counts))  # the same class, built at those widths
    rebuilt.load_state_dict(small.state_dict())  # strict: the same tensors with the same shapes
    assert n_params(small) == n_params(rebuilt)
    if counts != space.full:
        assert n_params(small) < n_params(space.model)


def test_full_width_with_original_weights_reproduces_the_model(chain):
    cls, model, x, manifold = chain
    space = manifold.space
    full = space.build(space.full)
    full.load_state_dict(space.model.state_dict())
    torch.testing.assert_close(full(x), model(x), rtol=1e-5, atol=1e-5)


def test_flops_and_parameters_fall_with_width(chain):
    cls, model, x, manifold = chain
    space = manifold.space
    nets = [space.build(space.resolve(w)) for w in (1.0, 0.75, 0.5, 0.25)]
    flops = [count_flops(n, x[:1]) for n in nets]
    params = [n_params(n) for n in nets]
    assert flops == sorted(flops, reverse=True) and len(set(flops)) == 4, flops
    assert params == sorted(params, reverse=True) and len(set(params)) == 4, params
    assert flops[0] == count_flops(model, x[:1])  # folding BatchNorm costs nothing counted


def test_depthwise_conv_follows_its_group():
    """The depthwise conv has no group of its own: its channels are the expand conv's."""
    model = DepthwiseCNN().eval()
    x = torch.randn(2, 3, 8, 8)
    space = nm.WidthSpace(model, x)
    layer = next(l for l in space.layers if l.name == "dw")
    assert layer.depthwise and layer.out == layer.inp and layer.out[0].group == "expand"
    small = space.build(space.resolve({"expand": 5}))
    assert small.dw.weight.shape == (5, 1, 3, 3) and small.dw.groups == 5
    assert small(x).shape == (2, 6)


class Grouped(nn.Module):
    def __init__(self, groups=2, out=8):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3)
        self.mixer = nn.Conv2d(8, out, 3, groups=groups)
        self.b = nn.Conv2d(out, 4, 1)

    def forward(self, x):
        return self.b(F.relu(self.mixer(F.relu(self.a(x)))))


@pytest.mark.parametrize("groups, out, reason", [(2, 8, "grouped convolution"),
                                                 (8, 16, "channel multiplier")])
def test_other_grouped_convs_are_refused_naming_the_module(groups, out, reason):
    with pytest.raises(ValueError, match=rf"'mixer'.*{reason}"):
        nm.WidthSpace(Grouped(groups, out), torch.randn(1, 3, 9, 9))


def test_grouped_conv_is_refused_even_outside_the_morphed_groups():
    """Its weight shape would be generated wrongly whichever groups morph, so never silently."""
    with pytest.raises(ValueError, match="'mixer'"):
        nm.WidthSpace(Grouped(), torch.randn(1, 3, 9, 9), groups=["b"])


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        h = self.inp(x)
        h, _ = self.attn(h, h, h)
        return self.out(h.mean(1))


def test_attention_coupled_to_a_group_is_refused_naming_the_module():
    """Heads split the channels in blocks the coordinates cannot express: refused, not guessed."""
    with pytest.raises(ValueError, match=r"'attn' \(MultiheadAttention\)"):
        nm.WidthSpace(_Attention().eval(), torch.randn(2, 5, 8))


# ---------------------------------------------------------------------------------------------
# Output layers are found through whatever parameter-free ops follow them
# ---------------------------------------------------------------------------------------------

class Tail(nn.Module):
    """A 4-class head followed by a parameter-free ending: the head's outputs must stay fixed."""

    def __init__(self, ending):
        super().__init__()
        self.ending = ending
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 12)
        self.head = nn.Linear(12, 4)
        self.head_conv = nn.Conv2d(12, 4, 1)  # used by the flatten ending: a [n, 4, 1, 1] map

    def forward(self, x):
        h = F.relu(self.fc(F.relu(self.conv(x)).mean((2, 3))))
        if self.ending == "log_softmax":
            return F.log_softmax(self.head(h), dim=1)
        if self.ending == "sigmoid":
            return torch.sigmoid(self.head(h))
        if self.ending == "view":
            return self.head(h).view(x.shape[0], -1)
        return torch.flatten(self.head_conv(h[:, :, None, None]), 1)


@pytest.mark.parametrize("ending", ["log_softmax", "sigmoid", "view", "flatten"])
def test_output_layer_behind_parameter_free_ops_stays_fixed(ending):
    torch.manual_seed(0)
    model, x = Tail(ending).eval(), torch.randn(3, 3, 6, 6)
    head = "head_conv" if ending == "flatten" else "head"
    smoothed, _ = nm.smooth(model, x)  # would blame torch-pruning if it permuted the classes
    torch.testing.assert_close(smoothed(x), model(x), rtol=1e-5, atol=1e-6)
    space = nm.WidthSpace(smoothed, x)
    assert space.output_layers == [head]
    assert space.resolve(0.5)["fc"] == 6 and head not in space.full
    small = nm.WeightManifold(space, TINY_INR).sample(0.5, samples=1)
    assert small(x).shape == (3, 4)


class Similarity(nn.Module):
    """Scores from a product of two layers' outputs: which channels the output needs is unclear."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 5), nn.Linear(6, 5)

    def forward(self, x):
        return self.a(x) @ self.b(x).T


def test_output_the_reader_cannot_follow_asks_for_fixed():
    x = torch.randn(4, 6)
    with pytest.raises(ValueError, match=r"fixed=\[") as err:
        nm.WidthSpace(Similarity(), x)
    assert "torch-pruning" not in str(err.value)
    space = nm.WidthSpace(Similarity(), x, fixed=["a", "b"])
    assert space.output_layers == ["a", "b"]
    with pytest.raises(ValueError, match=r"fixed=\["):
        nm.smooth(Similarity(), x)
    nm.smooth(Similarity(), x, fixed=["a", "b"])  # the user says which outputs are fixed


class DeepSimilarity(Similarity):
    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(6, 6)

    def forward(self, x):
        return super().forward(torch.relu(self.hidden(x)))


def test_build_manifold_takes_fixed_and_smooths_only_the_groups_that_morph():
    from neumeta.experiment import build_manifold
    x = torch.randn(4, 6)
    quiet = lambda *a: None  # noqa: E731
    with pytest.raises(ValueError, match=r"fixed=\["):
        build_manifold(DeepSimilarity(), x, nm.INRConfig(hidden=8, depth=2, frequencies=2), log=quiet)
    manifold = build_manifold(DeepSimilarity(), x, nm.INRConfig(hidden=8, depth=2, frequencies=2),
                              fixed=["a", "b"], log=quiet)
    assert manifold.space.output_layers == ["a", "b"] and list(manifold.space.groups) == ["hidden"]
    image = torch.randn(2, 3, 32, 32)
    resnet = nm.create_model("resnet20")
    paper = build_manifold(resnet, image, nm.INRConfig(hidden=8, depth=2, frequencies=2), groups="paper",
                           log=quiet)
    assert set(paper.space.groups) == set(nm.WidthSpace(resnet, image, groups="paper").groups)
    folded = nm.fold_batchnorm(resnet, image)
    paper_model, untouched = paper.space.model, dict(folded.named_parameters())
    moved = {n for n, p in paper_model.named_parameters() if not torch.equal(p, untouched[n])}
    members = {m.rsplit(".", 1)[0] for g in paper.space.groups.values() for m in g.members}
    assert moved and all(any(n.startswith(m + ".") for m in members) for n in moved), moved
