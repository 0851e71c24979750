"""IBSI 1 mode: the phantoms through the extraction agree with the consensus values.

The phantoms (the CT phantom is CC BY-NC) are not in the repository: they are read from
``shared/data/ibsi`` beside it, or ``$SCLC_IBSI_DATA``.  Tests that need them
skip, saying where they looked, when the folder is absent.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
from radiomics import getFeatureClasses
from radiomics.base import RadiomicsFeaturesBase

from sclc_risk_node.node.cli import main
from sclc_risk_node.node.ibsi_cli import default_data_dir, load_references, read_phantom
from sclc_risk_node.scoring import ibsi
from sclc_risk_node.scoring.errors import InputError
from sclc_risk_node.scoring.ibsi import (
    ALL_ADJUSTMENTS,
    CONFIGURATIONS,
    FEATURE_MAP,
    Method,
    Outcome,
    ReferenceValue,
    centred_grid,
    compare,
    matches,
    parse_reference_csv,
)

DATA_DIR = default_data_dir()
needs_phantoms = pytest.mark.skipif(
    not (DATA_DIR / "digital_phantom").is_dir() or not (DATA_DIR / "ct_phantom").is_dir(),
    reason=f"IBSI phantoms not found in {DATA_DIR} (put shared/data/ibsi beside the repository or set SCLC_IBSI_DATA)",
)


@pytest.fixture(scope="module")
def references():
    return load_references()


def _report(configuration_name: str, method: Method, references, adjustments=ALL_ADJUSTMENTS):
    configuration = CONFIGURATIONS[configuration_name]
    image, mask = read_phantom(DATA_DIR, configuration.data_set)
    values = ibsi.extract(image, mask, configuration, method, adjustments)
    return compare(values, references, configuration, method)


def _outcomes(report) -> dict[str, Outcome]:
    return {row.ibsi_tag: row.outcome for row in report.comparisons}


# --- without the phantoms -----------------------------------------------------------------------


def test_every_mapped_feature_is_a_current_pyradiomics_feature():
    classes = getFeatureClasses()
    for mapping in FEATURE_MAP:
        feature_class, feature = mapping.pyradiomics.split("_", 1)
        names = classes[feature_class].getFeatureNames()
        assert feature in names, mapping.pyradiomics
        assert not names[feature], f"{mapping.pyradiomics} is deprecated in pyradiomics"
    assert len({m.pyradiomics for m in FEATURE_MAP}) == len(FEATURE_MAP) == 102
    assert len({m.ibsi_stem for m in FEATURE_MAP}) == len(FEATURE_MAP)


def test_reference_file_has_a_value_for_every_mapped_feature_and_configuration(references):
    for configuration in CONFIGURATIONS.values():
        for mapping in FEATURE_MAP:
            assert (configuration.name, mapping.ibsi_tag(configuration)) in references
    assert len(references) == 102 * len(CONFIGURATIONS)
    # Spot checks against the manual's tables: volume (mesh) and GLCM joint average.
    assert references[("digital", "morph_volume")] == ReferenceValue("digital", "morph_volume", 556, 4)
    assert references[("C", "morph_volume")].value == 3.67e5 and references[("C", "morph_volume")].tolerance == 6e3
    assert references[("A", "cm_joint_avg_2_5D_avg")].value == 21.3
    assert references[("E", "ngl_dc_entr_3D")] == ReferenceValue("E", "ngl_dc_entr_3D", 7.06, 0.02)


def test_texture_tags_follow_the_configuration_dimension():
    glcm = next(m for m in FEATURE_MAP if m.pyradiomics == "glcm_JointAverage")
    glszm = next(m for m in FEATURE_MAP if m.pyradiomics == "glszm_ZoneEntropy")
    shape = next(m for m in FEATURE_MAP if m.pyradiomics == "shape_MeshVolume")
    assert glcm.ibsi_tag(CONFIGURATIONS["A"]) == "cm_joint_avg_2_5D_avg"
    assert glcm.ibsi_tag(CONFIGURATIONS["C"]) == "cm_joint_avg_3D_avg"
    assert glszm.ibsi_tag(CONFIGURATIONS["B"]) == "szm_zs_entr_2_5D"
    assert shape.ibsi_tag(CONFIGURATIONS["B"]) == "morph_volume"


def test_configurations_as_pyradiomics_settings():
    c = CONFIGURATIONS["C"].pyradiomics_settings()
    assert c["resampledPixelSpacing"] == [2.0, 2.0, 2.0] and c["interpolator"] == "sitkLinear"
    assert c["resegmentRange"] == [-1000, 400] and c["binWidth"] == 25 and "binCount" not in c
    assert c["voxelArrayShift"] == 0 and c["gldm_a"] == 0 and c["distances"] == [1]
    assert "force2D" not in c
    b = CONFIGURATIONS["B"].pyradiomics_settings()
    assert b["force2D"] is True and b["force2Ddimension"] == 0
    assert b["resampledPixelSpacing"] == [2.0, 2.0, 0] and b["binCount"] == 32
    d = CONFIGURATIONS["D"].pyradiomics_settings()
    assert d["resegmentMode"] == "sigma" and d["resegmentRange"] == [-3.0, 3.0]
    e = CONFIGURATIONS["E"].pyradiomics_settings()
    assert e["interpolator"] == "sitkBSpline" and e["resegmentRange"] == [-1000, 400]
    a = CONFIGURATIONS["A"].pyradiomics_settings()
    assert "resampledPixelSpacing" not in a and a["resegmentRange"] == [-500, 400]
    with pytest.raises(ValueError, match="exactly one of bin_width and bin_count"):
        ibsi.IbsiConfiguration(name="X", data_set="ct_phantom", description="", bin_width=25, bin_count=32)


def test_match_rule_rounds_to_three_significant_digits_then_applies_the_tolerance():
    assert matches(9.308, 9.31, 0.0)
    assert not matches(9.245, 9.31, 0.06)
    assert matches(9.25, 9.31, 0.06)
    assert matches(2.1549, 2.15, 0.0) and not matches(2.156, 2.15, 0.0)
    assert matches(-0.35549, -0.355, 0.0)
    assert matches(3.6700049e5, 3.67e5, 0) and matches(3.61e5, 3.67e5, 6e3) and not matches(3.6e5, 3.67e5, 6e3)
    assert matches(0.0, 0.0, 0.0)
    assert not matches(math.nan, 1.0, 10.0)


def test_compare_reports_matched_out_of_tolerance_and_not_computed():
    configuration = CONFIGURATIONS["C"]
    refs = {
        ("C", "stat_mean"): ReferenceValue("C", "stat_mean", -49, 2.9),
        ("C", "stat_kurt"): ReferenceValue("C", "stat_kurt", 3.53, 0.23),
        ("C", "cm_joint_avg_3D_avg"): ReferenceValue("C", "cm_joint_avg_3D_avg", 39, 0.2),
        ("C", "ngt_busyness_3D"): ReferenceValue("C", "ngt_busyness_3D", 1.39, 0.01),
    }
    values = {
        "firstorder_Mean": -47.0,
        "firstorder_Kurtosis": 6.6,  # pyradiomics' kurtosis; IBSI's is the excess kurtosis, 3.6
        "glcm_JointAverage": 36.2,
        "ngtdm_Busyness": math.nan,
    }
    report = compare(values, refs, configuration, Method.IBSI)
    rows = {row.ibsi_tag: row for row in report.comparisons}
    assert set(rows) == set(tag for _, tag in refs)
    assert rows["stat_mean"].outcome is Outcome.MATCHED
    assert rows["stat_kurt"].outcome is Outcome.MATCHED and rows["stat_kurt"].value == pytest.approx(3.6)
    assert rows["cm_joint_avg_3D_avg"].outcome is Outcome.OUT_OF_TOLERANCE
    assert rows["ngt_busyness_3D"].outcome is Outcome.NOT_COMPUTED and rows["ngt_busyness_3D"].value is None
    assert [report.count(o) for o in (Outcome.MATCHED, Outcome.OUT_OF_TOLERANCE, Outcome.NOT_COMPUTED)] == [2, 1, 1]


def test_reference_csv_errors_name_the_problem():
    with pytest.raises(InputError, match="columns"):
        parse_reference_csv("configuration,tag,value\nC,x,1\n")
    with pytest.raises(InputError, match="row 2: value and tolerance must be numbers"):
        parse_reference_csv("configuration,ibsi_tag,value,tolerance\nC,stat_mean,abc,1\n")
    with pytest.raises(InputError, match=r"row 3: \('C', 'stat_mean'\) appears twice"):
        parse_reference_csv("# note\nconfiguration,ibsi_tag,value,tolerance\nC,stat_mean,1,0\nC,stat_mean,2,0\n")


def test_centred_grid_keeps_the_image_centre_and_rounds_the_size_up():
    # The CT phantom's geometry; the IBSI diagnostic values give 100 x 99 x 90 voxels after interpolation.
    image = sitk.Image(204, 201, 60, sitk.sitkFloat32)
    image.SetSpacing((0.977, 0.977, 3.0))
    image.SetOrigin((-174.39, -79.63, -100.4))
    size, spacing, origin = centred_grid(image, (2.0, 2.0, 2.0))
    assert size == (100, 99, 90) and spacing == (2.0, 2.0, 2.0)
    old_centre = np.array(image.GetOrigin()) + (np.array(image.GetSize()) - 1) / 2 * np.array(image.GetSpacing())
    new_centre = np.array(origin) + (np.array(size) - 1) / 2 * np.array(spacing)
    np.testing.assert_allclose(new_centre, old_centre, atol=1e-9)
    size_2d, spacing_2d, _ = centred_grid(image, (2.0, 2.0, None))
    assert size_2d == (100, 99, 60) and spacing_2d == (2.0, 2.0, 3.0)


def test_ibsi_binning_counts_bins_from_the_resegmentation_bound():
    # 5 x 5 x 5 cube at -939 ... -839 HU: IBSI bins from -1000 in 25 HU steps start at bin 3; pyradiomics' at bin 1.
    array = np.full((7, 7, 7), -1000, dtype=np.float32)
    array[1:6, 1:6, 1:6] = np.linspace(-939, -839, 125).reshape(5, 5, 5)
    image = sitk.GetImageFromArray(array)
    mask = sitk.GetImageFromArray((array > -1000).astype(np.uint8))
    configuration = CONFIGURATIONS["C"]
    roi = ibsi.ProcessedRoi(image, mask, mask, bin_lower_bound=-1000.0)
    settings = {"binWidth": 25, "label": 1}
    glcm = getFeatureClasses()["glcm"]
    ours = ibsi._ibsi_binning_class(glcm, roi.bin_lower_bound)(image, mask, **settings)
    stock = glcm(image, mask, **settings)
    inside = sitk.GetArrayFromImage(mask).astype(bool)
    assert ours._applyBinning(array.copy())[inside].min() == 3
    assert stock._applyBinning(array.copy())[inside].min() == 1
    # The subclass leaves pyradiomics' own class, which the node's extraction uses, untouched.
    assert glcm._applyBinning is RadiomicsFeaturesBase._applyBinning
    assert configuration.bin_width == 25


def test_phantom_mask_on_another_grid_is_refused():
    image = sitk.Image(5, 4, 4, sitk.sitkInt16)
    mask = sitk.Image(5, 4, 3, sitk.sitkUInt8)
    expected = r"mask grid \(size \(5, 4, 3\).*differs from the image grid \(size \(5, 4, 4\)"
    with pytest.raises(ibsi.MaskError, match=expected):
        ibsi.prepare_phantom(image, mask)
    with pytest.raises(ibsi.MaskError, match="the phantom mask is empty"):
        ibsi.prepare_phantom(image, sitk.Image(5, 4, 4, sitk.sitkUInt8))


def test_cli_names_the_missing_phantom_file(tmp_path, capsys):
    status = main(["ibsi", "--data-dir", str(tmp_path), "--configurations", "digital"])
    assert status == 2
    err = capsys.readouterr().err
    assert f"IBSI phantom file {tmp_path / 'digital_phantom' / 'image.nii.gz'} is missing" in err


def test_cli_names_an_unreadable_phantom_file(tmp_path, capsys):
    folder = tmp_path / "digital_phantom"
    folder.mkdir()
    (folder / "image.nii.gz").write_bytes(b"not a NIfTI file")
    (folder / "mask.nii.gz").write_bytes(b"not a NIfTI file")
    status = main(["ibsi", "--data-dir", str(tmp_path), "--configurations", "digital"])
    assert status == 2
    assert f"IBSI phantom file {folder / 'image.nii.gz'} cannot be read" in capsys.readouterr().err


def test_cli_rejects_an_unknown_configuration(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["ibsi", "--configurations", "C,F"])
    assert exit_info.value.code == 2
    assert "unknown configuration(s) F" in capsys.readouterr().err


def test_data_dir_override_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SCLC_IBSI_DATA", str(tmp_path))
    assert default_data_dir() == tmp_path


# --- with the phantoms --------------------------------------------------------------------------


@needs_phantoms
def test_digital_phantom_matches_every_mapped_feature(references):
    report = _report("digital", Method.IBSI, references)
    assert len(report.comparisons) == 102
    mismatched = {tag: outcome for tag, outcome in _outcomes(report).items() if outcome is not Outcome.MATCHED}
    assert mismatched == {}


@needs_phantoms
def test_digital_phantom_through_the_nodes_own_extraction(references):
    # The node's extract_all_features with the settings override: only the PCA axis lengths differ, because
    # pyradiomics uses the population covariance and the consensus values the sample covariance.
    report = _report("digital", Method.STOCK, references)
    mismatched = {tag for tag, outcome in _outcomes(report).items() if outcome is not Outcome.MATCHED}
    assert mismatched == {"morph_pca_min_axis", "morph_pca_least_axis"}
    rows = {row.ibsi_tag: row for row in report.comparisons}
    assert rows["stat_mean"].value == pytest.approx(2.1486, abs=1e-4)  # 159 / 74 voxels
    assert rows["cm_joint_avg_3D_avg"].outcome is Outcome.MATCHED


@needs_phantoms
@pytest.mark.slow
def test_ct_phantom_configuration_c_matches_every_mapped_feature(references):
    report = _report("C", Method.IBSI, references)
    assert len(report.comparisons) == 102
    assert report.count(Outcome.MATCHED) == 102, [r for r in report.comparisons if r.outcome is not Outcome.MATCHED]
    # Binning from pyradiomics' edges (a multiple of 25 HU below the ROI minimum) shifts every grey level by 2 bins.
    unbinned = _report("C", Method.IBSI, references, ALL_ADJUSTMENTS.without("bins_from_bound"))
    assert _outcomes(unbinned)["cm_joint_avg_3D_avg"] is Outcome.OUT_OF_TOLERANCE
    assert _outcomes(unbinned)["cm_contrast_3D_avg"] is Outcome.MATCHED


@needs_phantoms
@pytest.mark.slow
@pytest.mark.parametrize("configuration", ["A", "B", "D", "E"])
def test_ct_phantom_other_configurations_match_every_mapped_feature(configuration, references):
    report = _report(configuration, Method.IBSI, references)
    assert report.count(Outcome.MATCHED) == 102, [r for r in report.comparisons if r.outcome is not Outcome.MATCHED]


@needs_phantoms
@pytest.mark.slow
def test_cli_prints_the_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "ibsi.json"
    status = main(["ibsi", "--data-dir", str(DATA_DIR), "--configurations", "digital,C", "--json", str(out)])
    assert status == 0
    text = capsys.readouterr().out
    assert "== digital phantom (ibsi)" in text and "== CT phantom, configuration C (ibsi)" in text
    row = next(line for line in text.splitlines() if line.startswith("glcm_JointAverage") and "_3D_avg" in line)
    assert row.split()[1] == "cm_joint_avg_3D_avg" and row.split()[-1] == "matched"
    assert "  digital  ibsi   102/102 matched (102 matched, 0 out-of-tolerance, 0 not-computed)" in text
    assert "  C        ibsi   102/102 matched" in text
    document = json.loads(out.read_text())
    assert [(r["configuration"], r["method"], r["counts"]["matched"]) for r in document["reports"]] == [
        ("digital", "ibsi", 102),
        ("C", "ibsi", 102),
    ]
    c_report = document["reports"][1]
    assert c_report["pyradiomics_settings"]["resegmentRange"] == [-1000, 400]
    volume = next(f for f in c_report["features"] if f["ibsi_tag"] == "morph_volume")
    assert volume["reference"] == 367000 and volume["tolerance"] == 6000 and volume["outcome"] == "matched"


@needs_phantoms
def test_cli_prints_the_digital_phantom_table_with_stock_mismatches(capsys):
    status = main(["ibsi", "--configurations", "digital", "--method", "both", "--mismatches-only"])
    assert status == 0
    lines = capsys.readouterr().out.splitlines()
    assert "== digital phantom (stock) — digital phantom: 3D, no processing, fixed bin size 1" in lines
    header = next(line for line in lines if line.startswith("pyradiomics feature"))
    assert header.split() == ["pyradiomics", "feature", "IBSI", "tag", "ours", "reference", "tolerance", "outcome"]
    minor = next(line for line in lines if line.startswith("shape_MinorAxisLength"))
    assert minor.split() == ["shape_MinorAxisLength", "morph_pca_min_axis", "9.245", "9.31", "0.06", "out-of-tolerance"]
    assert not any(line.startswith("firstorder_Mean") for line in lines)  # matched rows are left out
    assert "  digital  stock  100/102 matched (100 matched, 2 out-of-tolerance, 0 not-computed)" in lines
    assert "  digital  ibsi   102/102 matched (102 matched, 0 out-of-tolerance, 0 not-computed)" in lines


@needs_phantoms
def test_cli_switches_off_an_ibsi_adjustment(capsys):
    status = main(["ibsi", "--configurations", "digital", "--without", "sample_covariance_axes", "--json"])
    assert status == 0
    document = json.loads(capsys.readouterr().out)
    assert document["ibsi_adjustments_off"] == ["sample_covariance_axes"]
    report = document["reports"][0]
    assert report["counts"] == {"matched": 100, "out-of-tolerance": 2, "not-computed": 0}


def test_cli_rejects_an_unknown_adjustment(capsys):
    with pytest.raises(SystemExit):
        main(["ibsi", "--without", "rounding"])
    assert "invalid choice: 'rounding'" in capsys.readouterr().err


@needs_phantoms
def test_cli_json_on_stdout_shows_stock_mismatches(capsys):
    status = main(["ibsi", "--data-dir", str(DATA_DIR), "--configurations", "digital", "--method", "both", "--json"])
    assert status == 0
    document = json.loads(capsys.readouterr().out)
    counts = {r["method"]: r["counts"] for r in document["reports"]}
    assert counts == {
        "stock": {"matched": 100, "out-of-tolerance": 2, "not-computed": 0},
        "ibsi": {"matched": 102, "out-of-tolerance": 0, "not-computed": 0},
    }
