"""Data in, no model: the original layout (`layout`), masks and palettes (`masks`), phantoms, NIfTI volumes
(`volumes`) and DICOM series (`dicom`).

The original layout's names are re-exported here, so `from segdiff.data import SegDataset` reads as before.
"""

from .layout import DATA_INFO, Case, SegDataset, data_info, find_cases, read_image, read_mask, segtypes

__all__ = ["DATA_INFO", "Case", "SegDataset", "data_info", "find_cases", "read_image", "read_mask", "segtypes"]
