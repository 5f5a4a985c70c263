"""Image grids (previews, generate.py, the scale sweep's figures) through diffusers'
make_image_grid: image i at row i // cols, column i % cols."""

import numpy as np
import pytest
from PIL import Image

from sdft.eval.grids import image_grid, labelled_grid


def solid(value: int) -> Image.Image:
    return Image.new("RGB", (4, 3), (value, value, value))


def test_image_grid_places_images_row_major():
    grid = np.asarray(image_grid([solid(v) for v in (10, 20, 30, 40, 50, 60)], rows=2))
    assert grid.shape == (6, 12, 3)  # 2 rows x 3 columns of 3 x 4 images
    assert [grid[r * 3, c * 4, 0] for r in range(2) for c in range(3)] == [10, 20, 30, 40, 50, 60]


def test_image_grid_refuses_rows_it_cannot_fill():
    with pytest.raises(ValueError, match="5 images do not fill 2 equal rows"):
        image_grid([solid(0)] * 5, rows=2)


def test_labelled_grid_puts_the_grid_below_and_right_of_its_labels():
    images = [solid(v) for v in (10, 20, 30, 40)]
    out = labelled_grid(images, ["row a", "row b"], ["0.0", "1.0"], title="t")
    assert out.width > 8 and out.height > 6
    pixels = np.asarray(out)
    assert pixels[-1, -1, 0] == 40 and pixels[-3, -5, 0] == 30  # bottom-right cell is image 4
