"""The grid (INRConfig(grid=True)): a learned full-width table per tensor, read at each row's
(jittered) coordinates by bilinear interpolation and added to the INR's output at every width."""
import pytest
import torch
import torch.nn.functional as F

import neumeta as nm
from neumeta.data import TensorLoader
from neumeta.experiment import build_manifold
from neumeta.io import load_manifold, save_manifold
from neumeta.train import FitConfig

GRID = nm.INRConfig(hidden=16, depth=3, frequencies=2, grid=True)


def _manifold():
    torch.manual_seed(0)
    model, x = nm.create_model("lenet").eval(), torch.randn(16, 1, 28, 28)
    return build_manifold(model, x[:2], GRID, log=lambda *a: None), model, x


def _rows_with_and_without_grid(manifold, counts):
    return manifold.row_values(counts), manifold.row_values(counts, grid=False)


def test_a_fresh_grid_adds_nothing():
    manifold, _, _ = _manifold()
    with_grid, alone = _rows_with_and_without_grid(manifold, manifold.space.resolve(0.5))
    for a, b in zip(with_grid, alone):
        assert torch.equal(a, b)


def test_channel_centres_read_their_own_entry_so_the_grid_can_hold_the_model_exactly():
    """The grid set to what the INR misses gives back the reference network at full width
    (noise-free), in the weights' own units."""
    manifold, model, x = _manifold()
    full = manifold.space.full
    inr = manifold.row_values(full)
    with torch.no_grad():
        for table, reference, values in zip(manifold.grid, manifold.original_rows(), inr):
            table.copy_((reference - values).reshape(table.shape))
    params = manifold.params_from_rows(manifold.row_values(full), full)
    outputs = torch.func.functional_call(manifold.space.model, params, (x,))
    assert (outputs - model(x)).abs().max() <= 1e-4


def test_half_width_reads_the_mean_of_each_two_by_two_cell_scaled_to_its_fan_in():
    manifold, _, _ = _manifold()
    torch.manual_seed(1)
    with torch.no_grad():
        for table in manifold.grid:
            table.normal_()
    counts = manifold.space.resolve(0.5)
    with_grid, alone = _rows_with_and_without_grid(manifold, counts)
    i = next(k for k, s in enumerate(manifold.specs) if s.name == "conv2.weight")
    table = manifold.grid[i].detach()  # [C_out, C_in, elements]
    c_out, c_in = table.shape[:2]
    pooled = F.avg_pool2d(table.permute(2, 0, 1).unsqueeze(0), 2).squeeze(0).permute(1, 2, 0)
    c_in_half = manifold.space.layer_channels(manifold.specs[i].layer, counts)[0]
    expected = pooled.reshape(-1, table.shape[2]) * c_in / c_in_half
    assert torch.allclose(with_grid[i] - alone[i], expected, atol=1e-5)


@pytest.mark.filterwarnings("ignore::neumeta.train.PoorReconstructionWarning")  # 2 pre-fit steps
def test_the_grid_trains_under_the_coordinate_noise_and_survives_a_save(tmp_path):
    manifold, _, x = _manifold()
    y = torch.randint(0, 10, (16,))
    config = FitConfig(prefit_steps=2, steps=3, eval_every=1000, warmup=0.0)
    result = nm.fit(manifold, nm.ClassificationTask(10), TensorLoader(x, y, batch_size=8), None, config,
                    progress=False)
    assert any(table.detach().abs().max() > 0 for table in result.manifold.grid)
    path = tmp_path / "grid.neumeta"
    save_manifold(result.manifold, path)
    loaded = load_manifold(path)
    assert loaded.inr_config.grid
    for a, b in zip(loaded.grid, result.manifold.grid):
        assert torch.equal(a, b)
    assert torch.equal(loaded.sample(0.75, samples=5)(x), result.manifold.sample(0.75, samples=5)(x))


def test_grid_with_another_table_of_plain_weights_is_refused():
    with pytest.raises(ValueError, match="grid"):
        nm.INRConfig(grid=True, detail=True)
    with pytest.raises(ValueError, match="grid"):
        nm.INRConfig(grid=True, residual="cells")
