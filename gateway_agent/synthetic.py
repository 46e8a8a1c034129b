"""Realistic synthetic DICOM (CT phantoms with planted PHI) for tests, benchmarks, walkthrough."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
)

__all__ = [
    "PHI_MARKERS",
    "FleetScanner",
    "Patient",
    "ct_phantom_hu",
    "make_ct_series",
    "make_ct_slice",
    "make_fleet_series",
    "synthetic_fleet",
    "synthetic_uid",
    "write_series",
]

#: Values planted into synthetic files; none of them may appear in any output byte, log or name.
PHI_MARKERS: tuple[str, ...] = (
    "PHIDOE",  # family name
    "PHIJANE",  # given name
    "PHIMRN4711",  # patient id
    "19450317",  # birth date
    "PHISTREET",  # address
    "PHIREFDOC",  # referring physician
    "PHIOTHERID",  # other patient ids
    "PHIACC99",  # accession number
    "PHIOPERATOR",  # operators' name
    "PHIPRIVATE",  # private tag content
    "PHINESTED",  # value deep in a sequence
    "PHIPREAMBLE",  # written into the 128-byte preamble
    "PHIINSTITUTE",  # institution name
)


@dataclass(frozen=True)
class Patient:
    """Who a synthetic study belongs to (all values are planted PHI markers by default)."""

    name: str = "PHIDOE^PHIJANE"
    patient_id: str = "PHIMRN4711"
    birth_date: str = "19450317"
    sex: str = "F"
    age: str = "079Y"
    extra: dict[str, str] = field(default_factory=dict)


def synthetic_uid(*parts: object) -> UID:
    """A deterministic valid UID (``2.25.<int>``) from arbitrary parts."""
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:16]
    return UID(f"2.25.{int.from_bytes(digest, 'big')}")


def ct_phantom_hu(rows: int = 512, cols: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """A body phantom in HU and its ground-truth class map.

    Classes: 0 air (-1000), 1 lung (-850), 2 fat (-100), 3 soft tissue (+40), 4 bone (+700).
    Returns ``(hu, labels)``, float32 and uint8 arrays of shape ``(rows, cols)``.
    """
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
    cy, cx = rows / 2, cols / 2
    ry, rx = rows * 0.36, cols * 0.44
    labels = np.zeros((rows, cols), np.uint8)
    body_outer = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    body_inner = ((yy - cy) / (ry * 0.9)) ** 2 + ((xx - cx) / (rx * 0.92)) ** 2 <= 1.0
    labels[body_outer] = 2
    labels[body_inner] = 3
    for side in (-1, 1):
        lung = ((yy - cy * 0.95) / (ry * 0.55)) ** 2 + (
            (xx - cx - side * rx * 0.42) / (rx * 0.3)
        ) ** 2 <= 1
        labels[lung] = 1
    spine = ((yy - (cy + ry * 0.62)) / (ry * 0.16)) ** 2 + ((xx - cx) / (rx * 0.12)) ** 2 <= 1
    labels[spine] = 4
    hu_of = np.array([-1000.0, -850.0, -100.0, 40.0, 700.0], np.float32)
    return hu_of[labels], labels


def make_ct_slice(
    *,
    patient: Patient | None = None,
    study_seed: str = "study-1",
    series_number: int = 1,
    instance_number: int = 1,
    rows: int = 512,
    cols: int = 512,
    noise_sd: float = 12.0,
    air_offset: float = 0.0,
    kernel: str = "STANDARD",
    manufacturer: str = "ACME Medical",
    model: str = "Scanner 3000",
    station_name: str = "CTROOM1",
    device_serial: str = "SN-000123",
    study_date: str = "20240611",
    seed: int | None = None,
    plant_phi: bool = True,
    subject: str = "adult",
    clinical_trial: bool = False,
) -> Dataset:
    """A realistic CT Image Storage instance (Explicit VR Little Endian) with a body phantom.

    ``plant_phi`` puts PHI markers into the places a real scanner or PACS leaves them:
    names and IDs, free text, a nested request sequence, a private block and the preamble.
    ``subject`` is ``"adult"``, ``"paediatric"`` (a parent as Responsible Person) or
    ``"veterinary"`` (species, breed and its registration, owner and responsible organization,
    as PS3.3 requires for an animal); ``clinical_trial`` adds the Clinical Trial Subject and
    Series Modules.
    """
    if subject not in ("adult", "paediatric", "veterinary"):
        raise ValueError('Argument "subject" must be "adult", "paediatric" or "veterinary".')
    patient = patient or Patient()
    rng = np.random.default_rng(
        seed if seed is not None else instance_number + 1000 * series_number
    )
    hu, _ = ct_phantom_hu(rows, cols)
    hu = hu + rng.normal(0.0, noise_sd, hu.shape).astype(np.float32)
    hu[hu <= -990] += air_offset
    intercept = -1024.0
    stored = np.clip(np.rint(hu - intercept), 0, 4095).astype(np.uint16)

    study_uid = synthetic_uid(study_seed, "study")
    series_uid = synthetic_uid(study_seed, "series", series_number)
    sop_uid = synthetic_uid(study_seed, "series", series_number, "instance", instance_number)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = (
        (b"PHIPREAMBLE " + patient.name.encode() + b"\0" * 128)[:128] if plant_phi else None
    )
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = study_date
    ds.SeriesDate = study_date
    ds.AcquisitionDate = study_date
    ds.ContentDate = study_date
    ds.StudyTime = "101500"
    ds.SeriesTime = "101700"
    ds.AcquisitionTime = f"1018{instance_number % 60:02d}"
    ds.ContentTime = f"1018{instance_number % 60:02d}"
    ds.AccessionNumber = "PHIACC99" if plant_phi else "ACC1"
    ds.Modality = "CT"
    ds.Manufacturer = manufacturer
    ds.InstitutionName = "PHIINSTITUTE General Hospital" if plant_phi else "Hospital"
    ds.InstitutionAddress = "1 PHISTREET, Springfield" if plant_phi else ""
    ds.ReferringPhysicianName = "PHIREFDOC^GREGORY" if plant_phi else ""
    ds.StationName = station_name
    ds.StudyDescription = (
        f"CT CHEST for {patient.name.replace('^', ' ')} MRN {patient.patient_id}"
        if plant_phi
        else "CT CHEST"
    )
    ds.SeriesDescription = "AXIAL 1.25mm"
    ds.OperatorsName = "PHIOPERATOR^TOM" if plant_phi else ""
    ds.ManufacturerModelName = model
    ds.PatientName = patient.name
    ds.PatientID = patient.patient_id
    ds.PatientBirthDate = patient.birth_date
    ds.PatientSex = patient.sex
    ds.PatientAge = patient.age
    if plant_phi:
        ds.OtherPatientIDs = "PHIOTHERID"
        ds.PatientAddress = "1 PHISTREET, Springfield"
        ds.PatientComments = f"Patient {patient.name} prefers mornings"
        req = Dataset()
        req.RequestedProcedureDescription = "CT CHEST PHINESTED"
        req.RequestedProcedureID = "PHINESTED-RP"
        req.ScheduledProcedureStepID = "PHINESTED-SPS"
        req.AccessionNumber = "PHIACC99"
        ds.RequestAttributesSequence = DicomSequence([req])
        ds.add_new((0x0009, 0x0010), "LO", "ACME PRIVATE")
        ds.add_new((0x0009, 0x1001), "LO", "PHIPRIVATE " + patient.name)
    ds.ContrastBolusAgent = ""
    ds.BodyPartExamined = "CHEST"
    ds.ScanOptions = "HELICAL MODE"
    ds.SliceThickness = "1.25"
    ds.KVP = "120"
    ds.DataCollectionDiameter = "500"
    ds.DeviceSerialNumber = device_serial
    ds.SoftwareVersions = "1.0"
    ds.ProtocolName = "CHEST ROUTINE"
    ds.ReconstructionDiameter = "360"
    ds.GantryDetectorTilt = "0"
    ds.TableHeight = "150"
    ds.RotationDirection = "CW"
    ds.ExposureTime = "500"
    ds.XRayTubeCurrent = "200"
    ds.Exposure = "100"
    ds.ConvolutionKernel = kernel
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = series_number
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = instance_number
    z = -1.25 * instance_number
    ds.ImagePositionPatient = [-180.0, -180.0, z]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.FrameOfReferenceUID = synthetic_uid(study_seed, "for")
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = z
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.PixelSpacing = [round(360.0 / cols, 6), round(360.0 / rows, 6)]
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    ds.RescaleIntercept = str(int(intercept))
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.PixelData = stored.tobytes()
    if subject != "adult":
        _add_responsible_party(ds, subject, plant_phi)
    if clinical_trial:
        _add_clinical_trial(ds, plant_phi)
    return ds


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _add_responsible_party(ds: Dataset, subject: str, plant_phi: bool) -> None:
    """Patient Module attributes of a child (a parent decides) or an animal (an owner does)."""
    ds.ResponsiblePerson = "PHIDOE^JOHN" if plant_phi else "DOE^JOHN"
    if subject == "paediatric":
        ds.ResponsiblePersonRole = "PARENT"
        return
    ds.ResponsiblePersonRole = "OWNER"
    ds.ResponsibleOrganization = "PHIINSTITUTE Kennel" if plant_phi else "Kennel"
    ds.PatientSpeciesDescription = "Canis lupus familiaris"
    ds.PatientSpeciesCodeSequence = DicomSequence(
        [_code("448771007", "SCT", "Canis lupus familiaris")]
    )
    ds.PatientBreedDescription = "Beagle"
    ds.PatientBreedCodeSequence = DicomSequence([_code("44743007", "SCT", "Beagle dog")])
    registration = Dataset()
    registration.BreedRegistrationNumber = "PHIOTHERID-KC" if plant_phi else "KC-0001"
    registration.BreedRegistryCodeSequence = DicomSequence(
        [_code("109200", "DCM", "America Kennel Club")]
    )
    ds.BreedRegistrationSequence = DicomSequence([registration])
    ds.PatientSexNeutered = "ALTERED"


def _add_clinical_trial(ds: Dataset, plant_phi: bool) -> None:
    """Clinical Trial Subject and Series Modules, with an ethics committee approval."""
    ds.ClinicalTrialSponsorName = "ACME Pharma"
    ds.ClinicalTrialProtocolID = "ACME-2024-01"
    ds.ClinicalTrialProtocolName = "Chest CT follow-up"
    ds.ClinicalTrialSiteID = "SITE7"
    ds.ClinicalTrialSiteName = "PHIINSTITUTE General Hospital" if plant_phi else "Hospital"
    ds.ClinicalTrialSubjectID = "SUBJ-0042"
    ds.ClinicalTrialProtocolEthicsCommitteeName = "PHIINSTITUTE IRB" if plant_phi else "IRB"
    ds.ClinicalTrialProtocolEthicsCommitteeApprovalNumber = "IRB-2024-117"
    ds.ClinicalTrialCoordinatingCenterName = "ACME Core Lab"
    ds.ClinicalTrialSeriesID = "BASELINE"


def make_ct_series(n: int, *, study_seed: str = "study-1", **kwargs: object) -> list[Dataset]:
    """``n`` slices of one series (same study, series and frame of reference)."""
    return [
        make_ct_slice(study_seed=study_seed, instance_number=i + 1, **kwargs)  # type: ignore[arg-type]
        for i in range(n)
    ]


def write_series(datasets: Sequence[Dataset], directory: Path, prefix: str = "IMG") -> list[Path]:
    """Write datasets as part-10 files named like a scanner would (``IMG0001.dcm``)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ds in enumerate(datasets, 1):
        path = directory / f"{prefix}{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


@dataclass(frozen=True)
class FleetScanner:
    """One scanner of a synthetic fleet: its original (identifying) device attributes and tune.

    A detuned scanner reads air too high (``air_offset`` HU added to air), the drift fleet QC
    must flag; ``noise_sd`` is the image noise in HU.
    """

    manufacturer: str
    model: str
    serial: str
    station: str
    noise_sd: float = 12.0
    air_offset: float = 0.0

    @property
    def detuned(self) -> bool:
        return self.air_offset != 0.0


def synthetic_fleet(n: int = 6, *, detuned: Sequence[int] = (2,)) -> list[FleetScanner]:
    """``n`` CT scanners of two models and two vendors; those at ``detuned`` read air +120 HU."""
    out = []
    for i in range(n):
        vendor = ("ACME Medical", "Borealis Imaging")[i % 2]
        out.append(
            FleetScanner(
                manufacturer=vendor,
                model=f"{vendor.split()[0]} CT {64 * (1 + i % 3)}",
                serial=f"SN-{7000 + i:06d}",
                station=f"CT{i + 1:02d}",
                noise_sd=11.0 + (i % 3),
                air_offset=120.0 if i in detuned else 0.0,
            )
        )
    return out


def make_fleet_series(
    scanner: FleetScanner,
    index: int,
    *,
    slices: int = 3,
    rows: int = 64,
    cols: int = 64,
    plant_phi: bool = True,
) -> list[Dataset]:
    """Series number ``index`` of ``scanner``: its own patient, study and acquisition date."""
    seed = f"{scanner.serial}-{index}"
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(seed.encode()).digest()[:4], "big"))
    patient = Patient(name=f"PHIDOE^S{index:04d}", patient_id=f"PHIMRN{index:06d}")
    return make_ct_series(
        slices,
        study_seed=seed,
        patient=patient,
        rows=rows,
        cols=cols,
        noise_sd=scanner.noise_sd * float(rng.uniform(0.92, 1.08)),
        air_offset=scanner.air_offset,
        manufacturer=scanner.manufacturer,
        model=scanner.model,
        station_name=scanner.station,
        device_serial=scanner.serial,
        study_date=f"2024{1 + index % 12:02d}{1 + index % 28:02d}",
        plant_phi=plant_phi,
        series_number=index + 1,  # seeds the slices' noise
    )
