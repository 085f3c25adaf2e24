"""The README's example, run as written except for a shorter fit schedule."""
import contextlib
import io
import re
import warnings
from pathlib import Path

import pytest

import neumeta as nm
from neumeta.data.fashion_mnist import fashion_mnist_available

README = Path(__file__).resolve().parents[1] / "README.md"
SCHEDULE = "nm.FitConfig(prefit_steps=1000, steps=2500)"
SHORT = "nm.FitConfig(prefit_steps=20, steps=20, eval_every=20)"


def readme_example() -> str:
    """The first python block after the heading "Your own model and data"."""
    text = README.read_text()
    section = text.split("## Your own model and data", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_is_short_enough():
    assert len(README.read_text().splitlines()) <= 250


@pytest.mark.skipif(not fashion_mnist_available(), reason="needs Fashion-MNIST (`make test` gets it)")
def test_readme_example_runs(tmp_path, monkeypatch):
    code = readme_example()
    assert SCHEDULE in code, "the README's fit schedule changed: update SCHEDULE here"
    monkeypatch.chdir(tmp_path)
    printed = io.StringIO()
    namespace = {"__name__": "readme_example"}
    with contextlib.redirect_stdout(printed), warnings.catch_warnings():
        warnings.simplefilter("ignore", nm.NeverLearnedWarning)  # 20 + 20 steps may not leave chance
        exec(compile(code.replace(SCHEDULE, SHORT), "README.md", "exec"), namespace)

    lines = [line for line in printed.getvalue().splitlines() if line.startswith("width")]  # not fit's log
    assert [line.split(":")[0].split()[-1] for line in lines] == ["1.0", "0.75", "0.5", "0.25"]
    params = [int(re.search(r"([\d,]+) parameters", line).group(1).replace(",", "")) for line in lines]
    assert params == sorted(params, reverse=True) and params[0] > params[-1]
    assert params[0] == sum(p.numel() for p in namespace["model"].parameters())  # full width = the model
    loaded = nm.load(tmp_path / "net.neumeta", model=namespace["Net"]())  # as the README's comment says
    assert loaded.space.full == namespace["space"].full
    assert 'nm.load("net.neumeta", model=Net())' in code
