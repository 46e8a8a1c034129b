"""A synthetic fleet uploaded to a real Orthanc the way edge boxes do: de-identified, per box."""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import httpx

from gateway_agent.deid import Deidentifier
from gateway_agent.deid.keys import Keys
from gateway_agent.synthetic import FleetScanner, make_fleet_series, synthetic_fleet
from tests._orthanc import OrthancServer

SECRET = b"fleet-site-secret-0123456789abcdef"
EDGE_BOXES = ("EDGE01", "EDGE02", "EDGE03")


@dataclass
class LoadedFleet:
    scanners: list[FleetScanner]
    #: scanner pseudonym (what the archive holds) per scanner, in order
    pseudonyms: list[str]
    #: de-identified (study UID, series UID) per scanner
    series: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    instances: int = 0


def pseudonym(scanner: FleetScanner, secret: bytes = SECRET) -> str:
    return Keys(secret).scanner_pseudonym(
        scanner.manufacturer.encode(),
        scanner.model.encode(),
        scanner.serial.encode(),
        scanner.station.encode(),
    )


def upload(server: OrthancServer, data: bytes) -> None:
    r = httpx.post(server.base_url + "/instances", content=data, auth=server.auth, timeout=30)
    r.raise_for_status()


def load_fleet(
    server: OrthancServer,
    *,
    scanners: int = 6,
    series_per_scanner: int = 4,
    slices: int = 3,
    size: int = 48,
    start: int = 0,
) -> LoadedFleet:
    """Each scanner's series go through the edge boxes in turn (mobile scanners move)."""
    fleet = synthetic_fleet(scanners)
    boxes = {box: Deidentifier(SECRET, station_name=box) for box in EDGE_BOXES}
    loaded = LoadedFleet(fleet, [pseudonym(s) for s in fleet])
    for i, scanner in enumerate(fleet):
        for j in range(start, start + series_per_scanner):
            box = boxes[EDGE_BOXES[(i + j) % len(EDGE_BOXES)]]
            for ds in make_fleet_series(scanner, j, slices=slices, rows=size, cols=size):
                box.deidentify_dataset(ds)
                buf = io.BytesIO()
                ds.save_as(buf, enforce_file_format=True)
                upload(server, buf.getvalue())
                loaded.instances += 1
            loaded.series.setdefault(loaded.pseudonyms[i], []).append(
                (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID))
            )
    return loaded
