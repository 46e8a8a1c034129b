"""Input and output checks for scripts/container-test, run inside the image (its own pydicom).

    python dicomcheck.py make DIR N [SEED]         N synthetic CT files with planted PHI in DIR
    python dicomcheck.py check DIR N [TEXT...]     DIR holds exactly N de-identified instances
                                                   and no PHI marker is in them or in any TEXT file

Exit status 0 when the check holds; otherwise one line per problem and status 1.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pydicom

from gateway_agent.synthetic import PHI_MARKERS, make_ct_series, write_series


def make(directory: Path, n: int, seed: str) -> None:
    """Write ``n`` 128x128 CT slices of one study (every PHI marker planted) into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    write_series(make_ct_series(n, study_seed=seed, rows=128, cols=128), directory, prefix=seed)


def problems(directory: Path, n: int, texts: list[Path]) -> list[str]:
    """What is wrong with the de-identified files in ``directory`` (empty when all is well)."""
    found: list[str] = []
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    uids: set[str] = set()
    for path in files:
        raw = path.read_bytes()
        for marker in PHI_MARKERS:
            if marker.encode() in raw:
                found.append(f"{path.name}: PHI marker {marker} in the bytes")
        if any(marker in str(path) for marker in PHI_MARKERS):
            found.append(f"{path.name}: PHI marker in the file name")
        ds = pydicom.dcmread(path)
        if ds.get("PatientIdentityRemoved") != "YES":
            found.append(f"{path.name}: PatientIdentityRemoved is not YES")
        if not str(ds.SOPInstanceUID).startswith("2.25."):
            found.append(f"{path.name}: SOPInstanceUID not replaced")
        uids.add(str(ds.SOPInstanceUID))
    if len(uids) != n or len(files) != n:
        found.append(f"{len(files)} files, {len(uids)} distinct instances; expected {n}")
    for text in texts:
        content = text.read_text(errors="replace")
        found += [f"{text.name}: PHI marker {m}" for m in PHI_MARKERS if m in content]
    return found


def main(argv: list[str]) -> int:
    """The command line above."""
    if len(argv) >= 3 and argv[0] == "make":
        make(Path(argv[1]), int(argv[2]), argv[3] if len(argv) > 3 else "ctest")
        return 0
    if len(argv) >= 3 and argv[0] == "check":
        found = problems(Path(argv[1]), int(argv[2]), [Path(t) for t in argv[3:]])
        for line in found:
            print(f"  {line}")
        if not found:
            print(f"  {argv[2]} de-identified instances, no PHI marker in them or the logs")
        return 1 if found else 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
