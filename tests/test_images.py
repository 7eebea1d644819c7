import numpy as np
import pytest
import torch
from PIL import Image

from frugaldiff.images import from_uint8, make_grid, save_grid, to_uint8


@pytest.mark.parametrize("channels", [1, 3])
def test_uint8_round_trip_is_exact(channels):
    a = np.random.default_rng(0).integers(0, 256, (4, 5, 7, channels), dtype=np.uint8)
    a[0, 0, 0], a[0, 0, 1] = 0, 255
    x = from_uint8(a)
    assert x.dtype == torch.float32 and x.shape == (4, channels, 5, 7)
    assert x[0, :, 0, 0].eq(-1).all() and x[0, :, 0, 1].eq(1).all()
    assert x.min() >= -1 and x.max() <= 1
    np.testing.assert_array_equal(to_uint8(x), a)


def test_to_uint8_clamps_and_rounds():
    x = torch.tensor([-3.0, -1.0, 0.0, 0.5, 1.0, 7.0]).reshape(1, 1, 1, 6)
    out = to_uint8(x)
    assert out.dtype == np.uint8 and out.shape == (1, 1, 6, 1)
    assert out.ravel().tolist() == [0, 0, 128, 191, 255, 255]  # 127.5 → 128, 191.25 → 191


def test_make_grid_places_cells_between_padding():
    images = np.random.default_rng(1).integers(0, 200, (5, 4, 6, 3), dtype=np.uint8)
    grid = make_grid(images)  # 5 images → 3 columns, 2 rows
    assert grid.dtype == np.uint8 and grid.shape == (2 * 5 + 1, 3 * 7 + 1, 3)
    np.testing.assert_array_equal(grid[1:5, 1:7], images[0])
    np.testing.assert_array_equal(grid[1:5, 15:21], images[2])
    np.testing.assert_array_equal(grid[6:10, 8:14], images[4])
    assert (grid[0] == 255).all() and (grid[6:10, 15:21] == 255).all()  # border and the empty cell
    assert make_grid(images, ncols=5).shape == (6, 36, 3)
    assert make_grid(images, ncols=2, pad=0).shape == (12, 12, 3)


def test_save_grid_writes_grey_png_upscaled_to_64px_cells(tmp_path):
    images = np.random.default_rng(2).integers(0, 256, (4, 8, 8, 1), dtype=np.uint8)
    path = tmp_path / "new" / "folder" / "grid.png"
    save_grid(images, path)
    with Image.open(path) as saved:
        assert saved.format == "PNG" and saved.mode == "L"
        assert saved.size == (19 * 8, 19 * 8)  # 2×2 cells of 8 px + 3 pad, scale 8 → cells of 64 px
        pixels = np.asarray(saved)
    expected = np.repeat(np.repeat(make_grid(images)[..., 0], 8, axis=0), 8, axis=1)
    np.testing.assert_array_equal(pixels, expected)


def test_save_grid_rgb_with_explicit_scale_and_columns(tmp_path):
    images = np.zeros((3, 28, 28, 3), dtype=np.uint8)
    save_grid(images, tmp_path / "rgb.png", ncols=3, scale=2)
    with Image.open(tmp_path / "rgb.png") as saved:
        assert saved.mode == "RGB" and saved.size == ((3 * 29 + 1) * 2, 30 * 2)
    save_grid(images, tmp_path / "default.png")
    with Image.open(tmp_path / "default.png") as saved:  # 28 px cells → scale 3 (84 px)
        assert saved.size == ((2 * 29 + 1) * 3, (2 * 29 + 1) * 3)


def test_save_grid_refuses_other_channel_counts(tmp_path):
    with pytest.raises(ValueError, match="C = 1 or 3"):
        save_grid(np.zeros((2, 4, 4, 4), dtype=np.uint8), tmp_path / "rgba.png")
