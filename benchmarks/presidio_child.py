"""Presidio's DICOM image redactor over bench_pixels' corpus files, offline (run by another python).

Run by ``bench_pixels.py --presidio PYTHON`` with the python of a separate venv that has
``presidio-image-redactor`` (never a gateway-agent dependency)::

    python presidio_child.py WORKDIR OUTDIR FILE.dcm...

Offline set-up: Presidio's default NLP engine loads ``en_core_web_lg`` and downloads it when it
is missing (official spaCy models are not on PyPI). Here its ``SpacyNlpEngine`` is pointed at a
*blank* English spaCy pipeline written to ``WORKDIR/spacy-blank-en`` (a path that exists, so
nothing is downloaded): tokens and no NER. What finds PHI is therefore Presidio's predefined
pattern recognizers (dates, phone numbers, e-mail, ...) plus the DICOM engine's own deny list
built from the object's header (``use_metadata=True``: names and patient attributes in several
casings), the strongest offline set-up it has. OCR: pytesseract -> the ``tesseract`` program
(Debian ``tesseract-ocr``), one thread. Everything else is Presidio's defaults.

Writes ``OUTDIR/<name>`` (the redacted object, as Presidio saved it) for each input it could
redact, and on stdout a first JSON line with the versions, then one JSON line per input: name,
boxes (left, top, width, height), CPU s (this process and its tesseract children), error.
"""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path


def _cpu() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main(argv: list[str]) -> int:
    workdir, outdir, files = Path(argv[0]), Path(argv[1]), [Path(a) for a in argv[2:]]
    os.environ.setdefault("OMP_THREAD_LIMIT", "1")
    from importlib import metadata

    import pydicom
    import spacy
    from presidio_analyzer import AnalyzerEngine
    from presidio_analyzer.nlp_engine import SpacyNlpEngine
    from presidio_image_redactor import DicomImageRedactorEngine, ImageAnalyzerEngine

    names = ("presidio-image-redactor", "presidio-analyzer", "spacy", "pytesseract", "pydicom")
    versions = {name: metadata.version(name) for name in names}
    print(json.dumps({"versions": versions}), flush=True)
    blank = workdir / "spacy-blank-en"
    if not blank.exists():
        spacy.blank("en").to_disk(blank)
    nlp = SpacyNlpEngine(models=[{"lang_code": "en", "model_name": str(blank)}])
    analyzer = AnalyzerEngine(nlp_engine=nlp, supported_languages=["en"])
    engine = DicomImageRedactorEngine(image_analyzer_engine=ImageAnalyzerEngine(analyzer))
    outdir.mkdir(parents=True, exist_ok=True)
    for path in files:
        started = _cpu()
        record: dict[str, object] = {"name": path.name, "boxes": [], "error": None}
        try:
            instance = pydicom.dcmread(path)
            redacted, boxes = engine.redact_and_return_bbox(instance, use_metadata=True)
            redacted.save_as(outdir / path.name)
            record["boxes"] = [
                [int(b["left"]), int(b["top"]), int(b["width"]), int(b["height"])] for b in boxes
            ]
        except Exception as exc:  # a failed object is a measured outcome
            record["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        record["cpu_s"] = round(_cpu() - started, 4)
        print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
