"""Data sources: one LightningDataModule per family, all serving (B,1,H,W) images in [0, 1]."""

from ldir_pl.data.base import SliceDataModule
from ldir_pl.data.dicom import DicomDataModule
from ldir_pl.data.folder import FolderDataModule
from ldir_pl.data.lodopab import LoDoPaBDataModule
from ldir_pl.data.mix import MixDataModule
from ldir_pl.data.nifti import NiftiDataModule
from ldir_pl.data.packed import PackedDataModule
from ldir_pl.data.phantom import PhantomDataModule
from ldir_pl.data.readers import DataError
from ldir_pl.data.sinogram import SinogramDataModule

__all__ = ["DataError", "DicomDataModule", "FolderDataModule", "LoDoPaBDataModule", "MixDataModule",
           "NiftiDataModule", "PackedDataModule", "PhantomDataModule", "SinogramDataModule", "SliceDataModule"]
