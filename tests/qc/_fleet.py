"""Synthetic fleets of CT scans with known anomalies, as QC records or as files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from gateway_agent.qc import ScanFeatures, features_from_dataset
from gateway_agent.synthetic import make_ct_slice, write_series

SIZE = 96
DEVICES = ("EDGE01", "EDGE02", "EDGE03", "EDGE04", "EDGE05")


def normal_datasets(n: int, seed: int, *, size: int = SIZE) -> list[Dataset]:
    """``n`` normal scans spread over five devices, noise between 10 and 14 HU, over 10 days."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        device = DEVICES[i % len(DEVICES)]
        out.append(
            make_ct_slice(
                rows=size,
                cols=size,
                noise_sd=float(rng.uniform(10.0, 14.0)),
                seed=int(rng.integers(1 << 30)),
                station_name=device,
                model=f"Scanner {3000 + DEVICES.index(device) % 2}",
                study_seed=f"fleet-{seed}-{i}",
                study_date=f"202406{1 + i % 10:02d}",
                instance_number=i + 1,
                plant_phi=False,
            )
        )
    return out


def anomaly(kind: str, i: int = 0, *, size: int = SIZE, **kwargs: Any) -> Dataset:
    """One anomalous scan: ``detuned`` (air offset), ``noisy``, or ``kernel`` (wrong kernel)."""
    params: dict[str, Any] = {
        "detuned": {"air_offset": 120.0, "station_name": "EDGE02"},
        "noisy": {"noise_sd": 40.0, "station_name": "EDGE03"},
        "kernel": {"kernel": "BONE", "station_name": "EDGE04"},
    }[kind]
    params.update(kwargs)
    return make_ct_slice(
        rows=size,
        cols=size,
        study_seed=f"anomaly-{kind}",  # one series: i is the slice
        instance_number=900 + i,
        study_date="20240605",
        plant_phi=False,
        **params,
    )


def records(datasets: list[Dataset], prefix: str = "scan") -> list[ScanFeatures]:
    return [features_from_dataset(ds, file=f"{prefix}{i:03d}") for i, ds in enumerate(datasets)]


def write_fleet(datasets: list[Dataset], root: Path) -> list[Path]:
    paths = []
    for i, ds in enumerate(datasets):
        paths += write_series([ds], root / str(ds.StationName), prefix=f"S{i:03d}_")
    return paths
