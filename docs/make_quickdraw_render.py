"""Draws docs/quickdraw_render.png: QuickDraw drawings as the model sees them at 512 px.

Row 1: drawings of the dataset's numpy bitmap files (28x28, bicubic upscaled, inverted).
Row 2: ndjson stroke drawings with `data.render=bitmap`: rasterised at 28x28 like those
       files, then upscaled (the paper's recipe).
Row 3: the same ndjson drawings with `data.render=strokes`: drawn at 512 px, 4 px wide.

    .venv/bin/python docs/make_quickdraw_render.py
"""

from pathlib import Path

from PIL import Image, ImageDraw

from sdft.data.quickdraw import Drawing, QuickDrawDataset

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "quickdraw"
CATEGORIES = ["cat", "bicycle", "fish", "train"]  # in both formats
ROWS = [
    (".npy bitmap files (28x28, upscaled)", "npy", "bitmap"),
    ("ndjson, data.render=bitmap (28x28, upscaled)", "ndjson", "bitmap"),
    ("ndjson, data.render=strokes (512 px, stroke_width=4)", "ndjson", "strokes"),
]
SIZE, LABEL, SCALE = 512, 40, 2  # tiles at training resolution, shown at half size


def tile(drawing: Drawing, render: str) -> Image.Image:
    ds = QuickDrawDataset([drawing], SIZE, "{category}", render=render, stroke_width=4.0)
    x = ds[(0, False)]["pixel_values"][0]  # (R, R) in [-1, 1], black strokes on white
    return Image.fromarray(((x + 1) * 127.5).round().clamp(0, 255).byte().numpy())


def main() -> None:
    band = LABEL + SIZE
    grid = Image.new("L", (SIZE * len(CATEGORIES), band * len(ROWS)), 255)
    draw = ImageDraw.Draw(grid)
    for r, (label, fmt, render) in enumerate(ROWS):
        draw.text((12, r * band + 6), label, fill=0, font_size=28)
        for c, category in enumerate(CATEGORIES):
            source = DATA / ("bitmap" if fmt == "npy" else "ndjson") / f"{category}.{fmt}"
            drawing = Drawing(category, source, 3, "")  # row 3 / line 3 of the file
            grid.paste(tile(drawing, render), (c * SIZE, r * band + LABEL))
        if r:
            draw.line([(0, r * band), (grid.width, r * band)], fill=128, width=2)
    for c in range(1, len(CATEGORIES)):
        draw.line([(c * SIZE, 0), (c * SIZE, grid.height)], fill=200, width=2)
    out = ROOT / "docs" / "quickdraw_render.png"
    small = grid.resize((grid.width // SCALE, grid.height // SCALE), Image.Resampling.LANCZOS)
    small.save(out, optimize=True)
    print(out, out.stat().st_size // 1024, "KB")


if __name__ == "__main__":
    main()
