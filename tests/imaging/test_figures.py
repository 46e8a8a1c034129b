"""Figures people read: titles inside the figure, the format the name asks for, no white MR
images through CT presets, and a fleet scatter that stays readable with an extreme point."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure

from gateway_agent.cli import main
from gateway_agent.imaging import WINDOW_PRESETS, window_panel
from gateway_agent.qc import plot_fleet_qc
from gateway_agent.qc.features import ScanFeatures
from gateway_agent.synthetic import make_ct_slice, write_series

from ._images import image_dataset


def _outside(fig: Figure) -> list[str]:
    """Titles and annotations whose text reaches beyond the figure."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    box = fig.bbox
    texts = [ax.title for ax in fig.axes] + [t for ax in fig.axes for t in ax.texts]
    out = []
    for text in texts:
        if not text.get_text():
            continue
        e = text.get_window_extent(renderer)
        if e.x0 < box.x0 - 1 or e.x1 > box.x1 + 1 or e.y0 < box.y0 - 1 or e.y1 > box.y1 + 1:
            out.append(text.get_text())
    return out


@pytest.mark.parametrize("shape", [(64, 64), (128, 64), (64, 128)])
@pytest.mark.parametrize("count", [1, 2, 5, 10])
def test_preset_titles_are_not_clipped(shape: tuple[int, int], count: int) -> None:
    ds = make_ct_slice(rows=shape[0], cols=shape[1])
    assert _outside(window_panel(ds, list(WINDOW_PRESETS)[:count])) == []


@pytest.fixture
def mr_file(tmp_path: Path) -> Path:
    stored = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) % 400) + 100
    ds = image_dataset(stored, Modality="MR", WindowCenter=300, WindowWidth=400)
    path = tmp_path / "mr.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_window_on_mr_with_a_ct_preset_warns_and_is_not_white(
    mr_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from matplotlib.image import imread

    out = tmp_path / "mr.png"
    assert main(["window", str(mr_file), "--preset", "lung", "-o", str(out)]) == 0
    assert "no HU values" in capsys.readouterr().err
    grey = imread(out)[..., 0]
    assert 0.2 < float(grey.mean()) < 0.8  # the image's own window, not all white


def test_jpeg_output_is_jpeg_and_other_names_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (ct,) = write_series([make_ct_slice(rows=64, cols=64)], tmp_path / "in")
    for name in ("w.jpg", "w.JPEG"):
        assert main(["window", str(ct), "--preset", "lung", "-o", str(tmp_path / name)]) == 0
        assert (tmp_path / name).read_bytes()[:3] == b"\xff\xd8\xff"
    panel = tmp_path / "panel.jpg"
    assert main(["window", str(ct), "--all-presets", "-o", str(panel)]) == 0
    assert panel.read_bytes()[:3] == b"\xff\xd8\xff"
    assert main(["window", str(ct), "-o", str(tmp_path / "w.gif")]) == 1
    assert main(["cluster", str(ct), "-o", str(tmp_path / "c.tiff")]) == 1
    assert "name the output .png, .jpg or .jpeg" in capsys.readouterr().err
    assert not (tmp_path / "w.gif").exists() and not (tmp_path / "c.tiff").exists()


def _fleet(extreme: bool = True, mixed: bool = False) -> tuple[list[ScanFeatures], np.ndarray]:
    rng = np.random.default_rng(3)
    records = [
        ScanFeatures(
            file=f"s{i}.dcm",
            sop_instance_uid=f"2.25.{1000 + i}",
            device=f"DEV{i % 3}",
            hu_calibrated=True,
            avg_density=float(rng.normal(40, 4)),
            contrast=float(rng.normal(300, 8)),
        )
        for i in range(12)
    ]
    if extreme:
        records[5].avg_density, records[5].outlier = -1000.0, True
        records[5].reasons = ["avg_density low"]
    if mixed:
        records += [
            ScanFeatures(file=f"m{i}.dcm", device="MR", avg_density=900.0 + i, contrast=200.0)
            for i in range(3)
        ]
    return records, np.zeros(len(records), dtype=np.int64)


def test_fleet_scatter_keeps_the_bulk_readable_with_one_extreme_point() -> None:
    records, labels = _fleet()
    fig = plot_fleet_qc(records, labels, float("nan"))
    (ax,) = fig.axes
    lo, hi = ax.get_xlim()
    bulk = [r.avg_density for r in records if r.avg_density > -500]
    assert lo > -500 and hi - lo < 10 * (max(bulk) - min(bulk))  # not squeezed by -1000
    labels_text = [t.get_text() for t in ax.texts]
    assert any("-1000" in t and "off the axes" in t for t in labels_text)
    assert _outside(fig) == []
    fig.canvas.draw()
    for axis in (ax.xaxis, ax.yaxis):
        assert axis.get_major_formatter().get_offset() == ""  # no "-1e3" offset notation


def test_fleet_scatter_never_mixes_units_on_one_axis() -> None:
    records, labels = _fleet(extreme=False, mixed=True)
    fig = plot_fleet_qc(records, labels, 0.4)
    xlabels = sorted(ax.get_xlabel() for ax in fig.axes)
    assert xlabels == [
        "average density inside the body (HU)",
        "average density inside the body (modality units)",
    ]
    hu_axis = next(ax for ax in fig.axes if "(HU)" in ax.get_xlabel())
    assert hu_axis.get_xlim()[1] < 500  # the MR values (~900) are not on the HU axis
