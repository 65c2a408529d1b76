"""Reconstructions as DICOM series (CT Image Storage), so that a PACS viewer, 3D Slicer or OHIF opens them next
to the original scan.

A series gets new Series and SOP Instance UIDs and keeps, from the input's first DICOM file, the patient and
study modules and the frame of reference; inputs without DICOM (NIfTI volumes) get a new anonymous patient and
study. Geometry comes from the volume's affine: ImagePositionPatient of every slice, ImageOrientationPatient,
PixelSpacing and SliceThickness / SpacingBetweenSlices, so positions read back as they went in. Pixels are
signed 16-bit HU (RescaleSlope 1, RescaleIntercept 0); the SeriesDescription names the method and the views.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ldir_pl.atomic import atomic_dir

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

#: attributes copied from the input's file: Patient, General Study, Patient Study and Frame of Reference modules
PATIENT_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge", "PatientWeight",
                 "PatientIdentityRemoved", "DeidentificationMethod", "StudyInstanceUID", "StudyDate", "StudyTime",
                 "StudyID", "AccessionNumber", "ReferringPhysicianName", "StudyDescription", "FrameOfReferenceUID",
                 "PositionReferenceIndicator")


def geometry(affine: np.ndarray) -> tuple[list[float], list[float], list[float], float, np.ndarray]:
    """From a RAS voxel (row, column, slice) -> mm affine: ImageOrientationPatient (row direction, column
    direction), PixelSpacing (between rows, between columns), the slice step vector (LPS), the slice spacing,
    and the LPS position of voxel (0, 0, 0)."""
    lps = LPS_FROM_RAS @ np.asarray(affine, dtype=np.float64)
    down, along, step = lps[:3, 0], lps[:3, 1], lps[:3, 2]
    spacing = [float(np.linalg.norm(down)), float(np.linalg.norm(along))]
    orientation = [*(along / spacing[1]).tolist(), *(down / spacing[0]).tolist()]
    return orientation, spacing, step.tolist(), float(np.linalg.norm(step)), lps[:3, 3]


def write_dicom_series(folder: str | Path, hu: np.ndarray, affine: np.ndarray, description: str,
                       template: str | Path | None = None, series_number: int = 9001) -> list[Path]:
    """Write ``hu`` ((S, H, W) HU, slice order along the affine's third axis) as one CT series in ``folder``
    (whole or absent: it is filled under a temporary name and renamed when complete); returns the files."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    hu = np.asarray(hu)
    if hu.ndim != 3:
        raise ValueError(f"write_dicom_series: expected (slices, rows, columns) HU, got shape {hu.shape}")
    pixels = np.clip(np.rint(hu), -32768, 32767).astype(np.int16)
    source = pydicom.dcmread(template, stop_before_pixels=True) if template is not None else None
    orientation, spacing, step, dz, origin = geometry(affine)
    series_uid = generate_uid()
    now = time.strftime("%Y%m%d"), time.strftime("%H%M%S")
    study_uid, frame_uid = generate_uid(), generate_uid()
    files = []
    with atomic_dir(folder) as tmp:
        for k, image in enumerate(pixels):
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
            meta.MediaStorageSOPInstanceUID = generate_uid()
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds = Dataset()
            ds.file_meta = meta
            if source is not None:
                for key in PATIENT_STUDY:
                    if key in source:
                        setattr(ds, key, source.data_element(key).value)
            else:
                ds.PatientName, ds.PatientID = "Anonymous", "ldir-pl"
                ds.StudyInstanceUID, ds.FrameOfReferenceUID = study_uid, frame_uid
                ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = now[0], now[1], "1", ""
                ds.ReferringPhysicianName, ds.PatientBirthDate, ds.PatientSex = "", "", ""
                ds.PositionReferenceIndicator = ""
            ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE_STORAGE, meta.MediaStorageSOPInstanceUID
            ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = "CT", series_uid, series_number
            ds.SeriesDescription = description[:64]
            ds.SeriesDate, ds.SeriesTime, ds.ContentDate, ds.ContentTime = now[0], now[1], now[0], now[1]
            ds.InstanceNumber, ds.AcquisitionNumber = k + 1, 1
            ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
            ds.DerivationDescription = f"reconstructed by ldir-pl: {description}"[:1024]
            ds.Manufacturer, ds.KVP = "ldir-pl", ""
            ds.ImagePositionPatient = [float(v) for v in origin + k * np.asarray(step)]
            ds.ImageOrientationPatient = [round(v, 8) for v in orientation]
            ds.PixelSpacing = [round(v, 6) for v in spacing]
            ds.SliceThickness = round(dz, 6)
            ds.SpacingBetweenSlices = round(dz, 6)
            ds.SliceLocation = float(np.dot(ds.ImagePositionPatient, np.cross(orientation[:3], orientation[3:])))
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.Rows, ds.Columns = int(image.shape[0]), int(image.shape[1])
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
            ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "HU"
            ds.WindowCenter, ds.WindowWidth = 40, 400
            ds.PixelData = image.tobytes()
            path = tmp / f"{k + 1:04d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            files.append(Path(folder) / path.name)
    return files


def slice_affine(template: str | Path, size: int) -> np.ndarray:
    """The RAS affine of one DICOM slice area-resized to ``size`` x ``size`` (its pixel centres move with the
    cells), for writing a reconstructed slice where the input slice was."""
    import pydicom

    ds = pydicom.dcmread(template, stop_before_pixels=True)
    row_dir = np.asarray(ds.ImageOrientationPatient[:3], dtype=np.float64)
    col_dir = np.asarray(ds.ImageOrientationPatient[3:], dtype=np.float64)
    pr, pc = (float(v) for v in ds.PixelSpacing)
    fr, fc = int(ds.Rows) / size, int(ds.Columns) / size
    lps = np.eye(4)
    lps[:3, 0] = pr * fr * col_dir
    lps[:3, 1] = pc * fc * row_dir
    thickness = float(getattr(ds, "SliceThickness", 1.0) or 1.0)
    lps[:3, 2] = thickness * np.cross(row_dir, col_dir)
    lps[:3, 3] = np.asarray(ds.ImagePositionPatient, dtype=np.float64) + (fr - 1) / 2 * pr * col_dir \
        + (fc - 1) / 2 * pc * row_dir
    return LPS_FROM_RAS @ lps


def describe(method: str, label: str) -> str:
    """The SeriesDescription: method and measurement (e.g. ``ldir, 23 views``)."""
    return f"{method} {label}".strip()


__all__ = ["describe", "geometry", "slice_affine", "write_dicom_series"]
