"""Parameters and FLOPs of every registry model at compression γ = 0, 25, 50, 75 %.

Prints a markdown table and writes it to benchmarks/results/models.md. Run from the repo root:

    PYTHONPATH=src python benchmarks/models.py

For each model: ``WidthSpace`` with every internal group morphable (the default), the network
that ``manifold.sample(width)`` would return at width 1 - γ of every group (built by
``WidthSpace.build``: BatchNorm folded, so parameters are counted without it), its parameter
count, and its FLOPs for one input (``torch.utils.flop_counter.FlopCounterMode``: 2 per
multiply-add of convolutions and matrix products; element-wise ops not counted). Inputs are the
registry's default shapes, except the ImageNet-scale models (resnet18, resnet50, unet_r18) at
their usual 3x224x224. Weights do not matter for either number, so nothing is trained.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

try:
    import neumeta  # noqa: F401
except ImportError:  # let the script run without PYTHONPATH=src as well
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from neumeta.flops import count_flops, count_parameters
from neumeta.groups import WidthSpace
from neumeta.models import create_model, example_input, list_models

WIDTHS = (1.0, 0.75, 0.5, 0.25)
INPUT_SIZES = {"resnet18": (3, 224, 224), "resnet50": (3, 224, 224), "unet_r18": (3, 224, 224)}


def human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f}"


def measure(name: str):
    """(input shape, number of groups, [(params, flops) per width]) of registry model ``name``."""
    torch.manual_seed(0)
    model = create_model(name).eval()
    shape = INPUT_SIZES.get(name, tuple(example_input(name, batch=1).shape[1:]))
    x = torch.randn((2,) + shape)
    space = WidthSpace(model, x)
    rows = []
    for width in WIDTHS:
        net = space.build(space.resolve(width)).eval()
        rows.append((count_parameters(net), count_flops(net, x[:1])))
    return shape, len(space.groups), rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="*", default=None, help="registry names (default: all)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "models.md"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    header = ["model", "input", "groups"] + [f"γ = {round(100 * (1 - w))} %: params / FLOPs" for w in WIDTHS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * 3 + "---:|" * len(WIDTHS)]
    for name in args.models or list_models():
        shape, groups, rows = measure(name)
        cells = [f"{human(p)} / {human(f)}" for p, f in rows]
        lines.append(f"| {name} | {'x'.join(map(str, shape))} | {groups} | " + " | ".join(cells) + " |")
        print(lines[-1] if len(lines) > 3 else "\n".join(lines), flush=True)
    table = "\n".join(lines)
    note = ("\nParameters of the sampled (BatchNorm-folded) network; FLOPs of one forward pass of one "
            "input (2 per multiply-add). Every morphable group at width 1 - γ.\n")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(table + "\n" + note)
    print(note)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
