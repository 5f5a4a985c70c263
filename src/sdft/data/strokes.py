"""QuickDraw's simplified stroke format: checking a drawing and rasterising it.

A drawing is a list of strokes `[[x0, x1, ...], [y0, y1, ...]]` in a 0..255 box, aligned
to its top-left corner. The dataset's own numpy bitmaps were rendered from these at 28x28,
centred, with about 2 px of margin and strokes about 1.5 px wide; `render_strokes(s, 28)`
matches their framing and ink coverage (tests/test_data_quickdraw.py compares them), or
draws straight at the training resolution for sharper scribbles.
"""

from __future__ import annotations

from numbers import Real

import numpy as np
from PIL import Image, ImageDraw

BITMAP_SIDE = 28
MARGIN = 2 / 28  # of the side, around the 0..255 box: where the bitmap files put their ink
BITMAP_STROKE = 1.5  # px at 28x28: the bitmap files' ink coverage
SUPERSAMPLE = 4  # drawn 4x larger and box-filtered down: anti-aliased edges


def check_strokes(obj: object) -> list:
    """The `drawing` of one ndjson record; ValueError saying what is wrong otherwise."""
    strokes = obj.get("drawing") if isinstance(obj, dict) else None
    if not isinstance(strokes, list) or not strokes:
        raise ValueError("no 'drawing' list of strokes")
    for s in strokes:
        if not (isinstance(s, list) and len(s) >= 2 and isinstance(s[0], list)):
            raise ValueError("a stroke is not [[x...], [y...]]")
        xs, ys = s[0], s[1]
        if not isinstance(ys, list) or len(xs) != len(ys) or not xs:
            raise ValueError("a stroke is not [[x...], [y...]] of equal, non-zero length")
        if not all(isinstance(v, Real) and not isinstance(v, bool) for v in xs + ys):
            raise ValueError("a stroke has a coordinate that is not a number")
    return strokes


def render_strokes(strokes: list, size: int, stroke_width: float = BITMAP_STROKE) -> np.ndarray:
    """Rasterise strokes into a (size, size) uint8 image, white on black like the bitmap
    files; `stroke_width` is in pixels of the output."""
    big = size * SUPERSAMPLE
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    # simplified drawings sit in the top-left corner of their box; the bitmap files centre them
    xs_all = [x for s in strokes for x in s[0]]
    ys_all = [y for s in strokes for y in s[1]]
    dx = 127.5 - (min(xs_all) + max(xs_all)) / 2
    dy = 127.5 - (min(ys_all) + max(ys_all)) / 2
    scale = (1 - 2 * MARGIN) * big / 255.0
    ox, oy = MARGIN * big + dx * scale, MARGIN * big + dy * scale
    width = max(1, round(stroke_width * SUPERSAMPLE))
    r = width / 2
    for xs, ys, *_ in strokes:
        pts = [(ox + x * scale, oy + y * scale) for x, y in zip(xs, ys, strict=True)]
        if len(pts) == 1:  # a dot
            pts = pts * 2
        draw.line(pts, fill=255, width=width, joint="curve")
        for x, y in (pts[0], pts[-1]):  # round caps
            draw.ellipse((x - r, y - r, x + r, y + r), fill=255)
    return np.asarray(canvas.resize((size, size), Image.Resampling.BOX))
