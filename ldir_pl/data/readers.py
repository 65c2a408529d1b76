"""Readers for the file formats CT data comes in. Each returns float arrays and fails loudly, naming the file."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ldir_pl.errors import DataError

log = logging.getLogger(__name__)

DICOM_SUFFIXES = {".dcm", ".dicom", ".ima", ""}
IMAGE_SUFFIXES = {".npy", ".png", ".tif", ".tiff"}
CT_MODALITIES = ("CT",)


def require_dir(root: str | Path, what: str) -> Path:
    path = Path(root).expanduser()
    if not path.exists():
        raise DataError(f"{what}: folder {path} does not exist")
    if not path.is_dir():
        raise DataError(f"{what}: {path} is not a folder")
    return path


@dataclass(frozen=True)
class DicomSlice:
    path: Path
    patient_id: str
    hu: np.ndarray  # float32 (H, W) in Hounsfield units


def check_modality(ds, path: Path, modalities: tuple[str, ...]) -> None:
    """Refuse a file whose Modality is not one of ``modalities`` (CT by default): an MR or PET image has no
    Hounsfield units, and reconstructing it as if it had gives numbers that mean nothing."""
    modality = str(getattr(ds, "Modality", "") or "")
    if modality not in modalities:
        allowed = ",".join([*modalities, modality or "..."])
        raise DataError(f"{path}: Modality is {modality or 'missing'}, not {' or '.join(modalities)}; ldir-pl reconstructs "
                        f"CT in Hounsfield units (data.modalities=[{allowed}] reads it anyway)")


def read_dicom(path: str | Path, modalities: tuple[str, ...] = CT_MODALITIES) -> DicomSlice:
    """One CT slice in HU (RescaleSlope/Intercept applied); other modalities are refused."""
    path = Path(path)
    ds = open_dicom(path)
    check_modality(ds, path, modalities)
    patient = str(getattr(ds, "PatientID", "") or path.stem)
    return DicomSlice(path=path, patient_id=patient, hu=dicom_hu(ds, path))


def open_dicom(path: Path):
    """The pydicom dataset of ``path``; an unreadable file is a ``DataError`` naming it."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path)
    except (InvalidDicomError, OSError, EOFError, ValueError) as err:
        raise DataError(f"{path}: not a readable DICOM file ({type(err).__name__}: {err})") from err


def dicom_hu(ds, path: Path) -> np.ndarray:
    """The (H, W) float32 HU image of a dataset; missing or undecodable pixels name the file."""
    if "PixelData" not in ds:
        raise DataError(f"{path}: DICOM file holds no image (no PixelData; SOP class "
                        f"{getattr(ds, 'SOPClassUID', 'unknown')})")
    try:
        pixels = ds.pixel_array.astype(np.float32)
    except Exception as err:  # unsupported transfer syntax, truncated pixel data
        raise DataError(f"{path}: cannot decode pixel data ({type(err).__name__}: {err})") from err
    if pixels.ndim != 2:
        raise DataError(f"{path}: expected one 2-D slice, pixel array has shape {pixels.shape}")
    slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
    intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
    return pixels * slope + intercept


def list_files(root: Path, suffixes: set[str], what: str) -> list[Path]:
    """Files under ``root`` (recursively) with the given suffixes, sorted; others are reported, not hidden."""
    files, ignored = [], []
    for p in sorted(root.rglob("*")):
        if not p.is_file() or p.name.startswith("."):
            continue
        (files if p.suffix.lower() in suffixes else ignored).append(p)
    if ignored:
        log.warning("%s: ignoring %d file(s) in %s that are not %s, e.g. %s", what, len(ignored), root,
                    sorted(s or "<no suffix>" for s in suffixes), ignored[0].name)
    if not files:
        raise DataError(f"{what}: no {sorted(s or '<no suffix>' for s in suffixes)} files found in {root}")
    return files


def read_image_file(path: str | Path) -> np.ndarray:
    """A 2-D slice from .npy (float, as stored), .png/.tif (integer types scaled to [0, 1])."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            arr = np.load(path, allow_pickle=False)
        elif suffix in {".tif", ".tiff"}:
            import tifffile

            arr = tifffile.imread(path)
        elif suffix == ".png":
            from PIL import Image

            with Image.open(path) as im:
                arr = np.asarray(im)
        else:
            raise DataError(f"{path}: unsupported image format {suffix!r}; use one of {sorted(IMAGE_SUFFIXES)}")
    except DataError:
        raise
    except Exception as err:
        raise DataError(f"{path}: cannot read image ({type(err).__name__}: {err})") from err
    if arr.ndim == 3 and suffix == ".png" and arr.shape[-1] in (3, 4):
        arr = arr[..., :3].mean(-1) if np.issubdtype(arr.dtype, np.floating) else arr[..., 0]
    if arr.ndim != 2:
        raise DataError(f"{path}: expected a 2-D slice, got array of shape {arr.shape}")
    if np.issubdtype(arr.dtype, np.integer) and suffix != ".npy":
        arr = arr.astype(np.float32) / float(np.iinfo(arr.dtype).max)
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise DataError(f"{path}: image holds {int((~np.isfinite(arr)).sum())} NaN/inf values")
    return arr


def check_same_shape(shapes: dict[Path, tuple[int, ...]], what: str) -> tuple[int, ...]:
    """Mixed sizes mean mixed pixel spacing: refuse them rather than resample silently."""
    items = list(shapes.items())
    first_path, first = items[0]
    for path, shape in items[1:]:
        if shape != first:
            raise DataError(f"{what}: mixed image sizes: {first_path} is {first} but {path} is {shape}; "
                            "put slices of one size in a folder")
    return first
