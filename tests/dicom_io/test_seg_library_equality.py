"""The SEG reader's masks, now stacked by highdicom, equal the hand-placed masks voxel for voxel.

The former frame-by-frame reader (``_FramePlacer``, replaced in issue 11) produced exactly the
drawn mask on the CT grid for every SEG below: the synthetic cases are asserted so by
tests/dicom_io/test_seg.py, and for the real lung cases the former reader's mask equalled the
NRRD label voxel for voxel (checked once when the reader was replaced: lung1 837 voxels,
lung2 24,644).  So the expectation here is that drawn mask, and each case runs both of the
reader's highdicom paths: by CT instance (frames name their source) and as a volume (frames
share only the frame of reference).
"""

from __future__ import annotations

import copy

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from sclc_risk_node.dicom_io.ct_series import read_ct_series
from sclc_risk_node.dicom_io.seg import read_tumour_segment
from sclc_risk_node.dicom_io.synthetic import build_tumour_seg, tumour_segment_description
from tests.dicom_io.test_seg import (
    assert_mask_on_ct_grid,
    fraction_map,
    save,
    segmentation,
    study,  # noqa: F401  (module-scoped fixture)
    without_source_references,
)
from tests.realdata import pyradiomics_case_as_dicom

PATHS = {"by-instance": lambda seg: seg, "by-position": without_source_references}


def shuffled_frames(seg: Dataset, seed: int) -> Dataset:
    """The same SEG with its frames (per-frame groups and pixel data together) in a random order."""
    shuffled = copy.deepcopy(seg)
    n_frames = int(shuffled.NumberOfFrames)
    frame_bytes = len(shuffled.PixelData) // n_frames
    bits_per_frame = int(shuffled.Rows) * int(shuffled.Columns) * int(shuffled.BitsAllocated)
    assert bits_per_frame == 8 * frame_bytes, "bit-packed frames must fill whole bytes to be moved"
    order = np.random.default_rng(seed).permutation(n_frames)
    assert (order != np.arange(n_frames)).any()
    groups = list(shuffled.PerFrameFunctionalGroupsSequence)
    shuffled.PerFrameFunctionalGroupsSequence = [groups[i] for i in order]
    data = bytes(shuffled.PixelData)
    shuffled.PixelData = b"".join(data[i * frame_bytes : (i + 1) * frame_bytes] for i in order)
    return shuffled


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", ["binary", "fractional", "labelmap"])
def test_shuffled_frames_give_the_drawn_mask(study, kind, path, tmp_path):  # noqa: F811
    fractions, thresholded = fraction_map(study.mask)
    if kind == "binary":
        seg, expected = build_tumour_seg(study.datasets, study.mask), study.mask
    elif kind == "fractional":
        seg, expected = build_tumour_seg(study.datasets, fractions, fractional=True), thresholded
    else:
        labels = study.mask.astype(np.uint8)
        labels[0, :4, :4] = 2
        descriptions = [
            tumour_segment_description(),
            tumour_segment_description(label="Lung", property_type=codes.SCT.Lung, segment_number=2),
        ]
        seg = segmentation(study.datasets, labels, segmentation_type="LABELMAP", segment_descriptions=descriptions)
        expected = study.mask
    seg = PATHS[path](shuffled_frames(seg, seed=len(kind)))

    segment = read_tumour_segment(save(seg, tmp_path), study.ct)

    assert_mask_on_ct_grid(segment, study.ct, expected)


@pytest.mark.parametrize("path", PATHS)
def test_two_overlapping_segments_each_give_their_own_mask(study, path, tmp_path):  # noqa: F811
    """BINARY segments may overlap: each is read alone, the overlap belongs to both."""
    first = study.mask.astype(bool)
    second = np.zeros_like(first)
    second[:, :, 20:] = first[:, :, 20:]
    second[5, :3, :3] = True  # a voxel block outside the tumour, in the second segment only
    stacked = np.stack([first, second], axis=-1).astype(np.uint8)
    descriptions = [
        tumour_segment_description(label="Tumour A", segment_number=1),
        tumour_segment_description(label="Tumour B", segment_number=2),
    ]
    seg = PATHS[path](segmentation(study.datasets, stacked, segment_descriptions=descriptions))
    seg_path = save(seg, tmp_path)

    assert_mask_on_ct_grid(read_tumour_segment(seg_path, study.ct, segment_label="Tumour A"), study.ct, first)
    assert_mask_on_ct_grid(read_tumour_segment(seg_path, study.ct, segment_label="Tumour B"), study.ct, second)


@pytest.mark.slow
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", ["lung1", "lung2"])
def test_real_lung_seg_gives_the_nrrd_label(case, path, tmp_path):
    ct_dir, seg_path, _, label_path = pyradiomics_case_as_dicom(case)
    ct = read_ct_series(ct_dir)
    seg = PATHS[path](pydicom.dcmread(seg_path))
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(label_path))) > 0

    segment = read_tumour_segment(save(seg, tmp_path), ct)

    assert_mask_on_ct_grid(segment, ct, label)
    assert int(label.sum()) == {"lung1": 837, "lung2": 24_644}[case]
