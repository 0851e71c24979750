"""Frozen model files: seal, schema, semantic checks, baseline survival."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import re

import jsonschema
import pytest

from sclc_risk_node.models import shipped_model_path
from sclc_risk_node.scoring.errors import InputError, ModelFileError
from sclc_risk_node.scoring.model import (
    BaselineSurvival,
    Encoding,
    FrozenModel,
    canonical_json,
    canonical_sha256,
    load_shipped_schema,
    seal,
)
from sclc_risk_node.scoring.types import FeatureSpec, RingDefinition
from tests.scoring.model_fixtures import (
    BASELINE_SURVIVAL,
    BASELINE_TIMES,
    model_content,
    model_content_v2,
    sealed_model,
    sealed_model_json,
)


def load_changed(change) -> FrozenModel:
    """Apply ``change`` to the fixture content, seal it properly, and load it."""
    content = model_content()
    change(content)
    return FrozenModel.from_mapping(sealed_model(content))


def model_error(change) -> str:
    with pytest.raises(ModelFileError) as caught:
        load_changed(change)
    message = str(caught.value)
    assert "\n" not in message
    return message


# --- a valid file ----------------------------------------------------------------


def test_fixture_model_loads_with_all_parts():
    model = FrozenModel.from_json(sealed_model_json())
    assert model.identity.name == "test-fixture-integrated" and model.identity.version == "0.0.1"
    assert model.identity.demonstration is True
    assert re.fullmatch(r"[0-9a-f]{64}", model.identity.sha256)
    assert model.schema_version == 1 and model.created == "2024-01-02T03:04:05Z"
    assert model.extraction.pyradiomics_version == "3.1.4"
    assert model.extraction.settings["binWidth"] == 25
    assert dict(model.extraction.image_types) == {"Original": {}, "Wavelet": {}, "LoG": {"sigma": [2.0]}}
    assert model.extraction.ring == RingDefinition(2.0, 2.0, "signed-distance-mm")
    assert model.feature_specs == (
        FeatureSpec("ring", "original", "firstorder", "Mean"),
        FeatureSpec("tumour", "wavelet-LLH", "glcm", "Correlation"),
        FeatureSpec("ring", "log-sigma-2-0-mm-3D", "glszm", "ZoneEntropy"),
        FeatureSpec("tumour", "original", "shape", "Sphericity"),
    )
    assert [(t.mean, t.sd, t.coefficient) for t in model.radiomics_terms][1] == (0.5, 0.25, -1.0)
    assert model.radiomics_cutoff == 0.125 and model.radiomics_score_coefficient == 0.75
    assert model.risk_cutoff == 2.5
    assert [c.name for c in model.clinical_covariates] == [
        "overall_stage:IV",
        "ecog>=2",
        "lipi",
        "t_stage:T3-T4",
        "n_stage",
        "m_stage:M1c",
    ]
    assert model.clinical_fields == ("overall_stage", "ecog", "lipi", "t_stage", "n_stage", "m_stage")
    assert model.baseline_survival == BaselineSurvival(tuple(BASELINE_TIMES), tuple(BASELINE_SURVIVAL), 18.0, 2.5)
    assert model.training_summary["cohort"].startswith("none")


def test_model_is_immutable():
    model = FrozenModel.from_json(sealed_model_json())
    with pytest.raises(dataclasses.FrozenInstanceError):
        model.risk_cutoff = 0.0
    with pytest.raises(TypeError):
        model.training_summary["n"] = 5


# --- canonical form and seal --------------------------------------------------


def test_canonical_sha256_follows_the_documented_procedure():
    content = model_content()
    content["intended_use"] = "Prüfung – nicht klinisch"  # non-ASCII stays literal UTF-8
    expected_bytes = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    assert canonical_json(content) == expected_bytes
    assert canonical_sha256(content) == hashlib.sha256(expected_bytes).hexdigest()
    assert "Prüfung".encode() in canonical_json(content)


def test_hash_ignores_the_sha256_key_layout_and_key_order():
    sealed = sealed_model()
    assert canonical_sha256(sealed) == sealed["sha256"]
    reordered = dict(reversed(list(sealed.items())))
    text = json.dumps(reordered, indent=4)  # whitespace and order differ from the canonical form
    assert FrozenModel.from_json(text).identity.sha256 == sealed["sha256"]


def test_seal_replaces_a_stale_hash_and_does_not_touch_its_input():
    content = model_content()
    content["sha256"] = "0" * 64
    sealed = seal(content)
    assert content["sha256"] == "0" * 64
    assert sealed["sha256"] == canonical_sha256(model_content())


# --- tampering ----------------------------------------------------------------


def test_changing_one_coefficient_breaks_the_seal():
    sealed = sealed_model()
    sealed["radiomics"]["features"][2]["coefficient"] = 0.26
    with pytest.raises(ModelFileError) as caught:
        FrozenModel.from_mapping(sealed)
    message = str(caught.value)
    actual = canonical_sha256(sealed)
    assert message == (
        f"model file sha256 mismatch: content hashes to {actual[:16]}…, file says {sealed['sha256'][:16]}…"
        " (file was modified after it was frozen)"
    )


def test_editing_the_file_text_breaks_the_seal():
    text = sealed_model_json().replace('"risk_cutoff": 2.5', '"risk_cutoff": 3.5')
    with pytest.raises(ModelFileError, match=r"^model file sha256 mismatch: .*file was modified after it was frozen"):
        FrozenModel.from_json(text)


def test_flipping_the_demonstration_flag_breaks_the_seal():
    sealed = sealed_model()
    sealed["demonstration"] = False
    with pytest.raises(ModelFileError, match="sha256 mismatch"):
        FrozenModel.from_mapping(sealed)


def test_a_wrong_hash_format_is_a_schema_error():
    sealed = sealed_model()
    sealed["sha256"] = sealed["sha256"].upper()
    with pytest.raises(ModelFileError, match=r"^model file key 'sha256' is \"[0-9A-F]{64}\" \(must match"):
        FrozenModel.from_mapping(sealed)


# --- missing keys, bad schema, wrong types ------------------------------------


@pytest.mark.parametrize(
    ("path", "message"),
    [
        (("risk_cutoff",), "model file missing required key 'risk_cutoff'"),
        (("sha256",), "model file missing required key 'sha256'"),
        (("radiomics", "cutoff"), "model file missing required key 'radiomics.cutoff'"),
        (("extraction", "ring"), "model file missing required key 'extraction.ring'"),
        (
            ("baseline_survival", "linear_predictor_centre"),
            "model file missing required key 'baseline_survival.linear_predictor_centre'",
        ),
    ],
)
def test_missing_key(path, message):
    sealed = sealed_model()
    parent = sealed
    for key in path[:-1]:
        parent = parent[key]
    del parent[path[-1]]
    with pytest.raises(ModelFileError) as caught:
        FrozenModel.from_mapping(sealed)
    assert str(caught.value) == message


def test_missing_key_inside_a_feature():
    sealed = sealed_model()
    del sealed["radiomics"]["features"][3]["sd"]
    with pytest.raises(ModelFileError, match=r"^model file missing required key 'radiomics\.features\[3\]\.sd'$"):
        FrozenModel.from_mapping(sealed)


def test_several_missing_keys_are_counted():
    sealed = sealed_model()
    del sealed["risk_cutoff"], sealed["created"]
    with pytest.raises(
        ModelFileError, match=r"missing required key '(risk_cutoff|created)' \(and 1 more schema problem\)$"
    ):
        FrozenModel.from_mapping(sealed)


def test_unknown_key_is_refused():
    message = model_error(lambda content: content.update(intercept=0.1))
    assert message.startswith("model file has unknown key 'intercept' (allowed here: schema_version, name,")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c.update(risk_cutoff="2.5"), "model file key 'risk_cutoff' must be number, got string \"2.5\""),
        (lambda c: c.update(demonstration="yes"), "model file key 'demonstration' must be boolean, got string \"yes\""),
        (lambda c: c.update(demonstration=1), "model file key 'demonstration' must be boolean, got number 1"),
        (
            lambda c: c["radiomics"]["features"][0].update(mean=None),
            "model file key 'radiomics.features[0].mean' must be number, got null",
        ),
        (lambda c: c.update(clinical_covariates={}), "model file key 'clinical_covariates' must be array, got object"),
        (lambda c: c.update(schema_version=3), "model file schema_version 3 is not supported (this node reads 1, 2)"),
        (lambda c: c.update(schema_version=2), "model file missing required key 'applicability_domain'"),
        (
            lambda c: c["radiomics"]["features"][1].update(region="lung"),
            'model file key \'radiomics.features[1].region\' is "lung" (allowed: "tumour", "ring")',
        ),
        (
            lambda c: c["radiomics"]["features"][1].update(sd=0),
            "model file key 'radiomics.features[1].sd' is 0 (must be > 0)",
        ),
        (
            lambda c: c["radiomics"].update(features=[]),
            "model file key 'radiomics.features' has 0 entries (needs at least 1)",
        ),
        (
            lambda c: c["baseline_survival"]["survival"].__setitem__(0, 1.5),
            "model file key 'baseline_survival.survival[0]' is 1.5 (must be <= 1)",
        ),
        (
            lambda c: c["baseline_survival"].update(valid_until=11.5),
            "model file key 'baseline_survival.valid_until' is 11.5 (must be >= 12)",
        ),
        (
            lambda c: c["baseline_survival"].update(time_unit="days"),
            'model file key \'baseline_survival.time_unit\' is "days" (allowed: "months")',
        ),
        (
            lambda c: c["clinical_covariates"][0].update(field="stage"),
            "model file key 'clinical_covariates[0].field' is \"stage\"",
        ),
        (
            lambda c: c["clinical_covariates"][1]["encoding"].update(kind="spline"),
            "model file key 'clinical_covariates[1].encoding.kind' is \"spline\"",
        ),
        (
            lambda c: c["clinical_covariates"][1]["encoding"].pop("at_least"),
            "model file missing required key 'clinical_covariates[1].encoding.at_least'",
        ),
        (
            lambda c: c["clinical_covariates"][0]["encoding"].update(at_least=2),
            "model file has unknown key 'clinical_covariates[0].encoding.at_least'",
        ),
        (lambda c: c.update(created="yesterday"), "model file key 'created' is \"yesterday\" (must match"),
        (
            lambda c: c["clinical_covariates"][0].update(encoding={"levels": ["IV"]}),
            "model file missing required key 'clinical_covariates[0].encoding.kind'",
        ),
        (
            lambda c: c["extraction"]["image_types"].update(Median={}),
            'model file key \'extraction.image_types\' has a key "Median" that is not allowed (allowed: "Original",',
        ),
        (lambda c: c.update(training_summary=[]), "model file key 'training_summary' must be object, got array"),
    ],
)
def test_schema_problems(change, message):
    assert model_error(change).startswith(message)


def test_shipped_schema_is_valid_draft_2020_12_and_accepts_the_fixture():
    schema = load_shipped_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator(schema).validate(sealed_model())
    on_disk = json.loads(shipped_model_path("frozen-model.schema.json").read_text(encoding="utf-8"))
    assert on_disk == schema


def test_caller_may_pass_the_schema():
    schema = load_shipped_schema()
    assert FrozenModel.from_json(sealed_model_json(), schema=schema).risk_cutoff == 2.5
    schema["properties"]["risk_cutoff"] = {"type": "string"}
    with pytest.raises(ModelFileError, match="must be string"):
        FrozenModel.from_json(sealed_model_json(), schema=schema)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "model file is not valid JSON: Expecting property name"),
        ('{"a": NaN}', "model file is not valid JSON: NaN is not a number"),
        ('{"a": 1e999}', "model file is not valid JSON: number 1e999 is out of range"),
        ('{"a": 1, "a": 2}', "model file is not valid JSON: key 'a' appears twice in one object"),
        ("[1, 2]", "model file must hold a JSON object, not array"),
        (b"\xff{}", "model file is not UTF-8 text"),
    ],
)
def test_unreadable_files(text, message):
    with pytest.raises(ModelFileError) as caught:
        FrozenModel.from_json(text)
    assert str(caught.value).startswith(message)
    assert isinstance(caught.value, InputError)


# --- semantic checks (sealed files the schema accepts) ------------------------


def duplicate_first_feature(content):
    content["radiomics"]["features"].append(copy.deepcopy(content["radiomics"]["features"][0]))


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (
            duplicate_first_feature,
            "radiomics.features[4]: duplicate feature ring.original_firstorder_Mean (also radiomics.features[0])",
        ),
        (
            lambda c: c["radiomics"]["features"][3].update(image_type="wavelet-HHH"),
            "radiomics.features[3]: tumour.wavelet-HHH_shape_Sphericity: shape features exist only for image type original",
        ),
        (
            lambda c: c["radiomics"]["features"][2].update(image_type="log-sigma-3-0-mm-3D"),
            "radiomics.features[2]: image type log-sigma-3-0-mm-3D needs LoG sigma 3.0 (extraction gives ['2-0'])",
        ),
        (
            lambda c: c["extraction"]["image_types"]["LoG"].update(sigma=[2]),
            "radiomics.features[2]: image type log-sigma-2-0-mm-3D needs LoG sigma 2.0 (extraction gives ['2'])",
        ),
        (
            lambda c: c["extraction"]["image_types"].pop("Wavelet"),
            "radiomics.features[1]: image type wavelet-LLH needs image type Wavelet enabled in extraction.image_types",
        ),
        (
            lambda c: c["radiomics"]["features"][0].update(image_type="median"),
            "radiomics.features[0]: image type median is not a pyradiomics image type",
        ),
        (
            lambda c: c["extraction"]["ring"].update(outward_mm=0, inward_mm=0),
            "extraction.ring: ring must have a positive thickness",
        ),
        (
            lambda c: c["clinical_covariates"][3]["encoding"].update(levels=["T3", "T5"]),
            "clinical_covariates[3] (t_stage:T3-T4): levels ['T5'] are not levels of t_stage (allowed: T1, T2, T3, T4)",
        ),
        (
            lambda c: c["clinical_covariates"][0]["encoding"].update(levels=["I-II", "III", "IV"]),
            "clinical_covariates[0] (overall_stage:IV): indicator of every level of overall_stage is constant 1",
        ),
        (
            lambda c: c["clinical_covariates"][2]["encoding"]["map"].pop("poor"),
            "clinical_covariates[2] (lipi): ordinal map must cover exactly good, intermediate, poor"
            " (unknown: [], unmapped: ['poor'])",
        ),
        (
            lambda c: c["clinical_covariates"][3].update(encoding={"kind": "numeric"}),
            "clinical_covariates[3] (t_stage:T3-T4): numeric encoding needs a numeric field (ecog, lipi, age), not t_stage",
        ),
        (
            lambda c: c["clinical_covariates"][1]["encoding"].update(at_least=5),
            "clinical_covariates[1] (ecog>=2): threshold at_least 5 makes ecog (0-4) a constant",
        ),
        (
            lambda c: c["clinical_covariates"].append(
                {"name": "age", "field": "age", "encoding": {"kind": "indicator", "levels": ["70"]}, "coefficient": 1}
            ),
            "clinical_covariates[6] (age): indicator encoding needs a categorical field, age is numeric only",
        ),
        (
            lambda c: c["clinical_covariates"][5].update(name="lipi"),
            "clinical_covariates[5] (lipi): duplicate covariate name (also clinical_covariates[2])",
        ),
        (lambda c: c["clinical_covariates"][5].update(name="radiomics_score"), "the name radiomics_score is reserved"),
        (
            lambda c: c["baseline_survival"]["survival"].__setitem__(5, 0.9),
            "baseline_survival.survival must not increase over time",
        ),
        (
            lambda c: c["baseline_survival"]["times"].__setitem__(2, 2.0),
            "baseline_survival.times must be strictly increasing",
        ),
        (lambda c: c["baseline_survival"]["times"].append(16.0), "baseline_survival: 10 times but 9 survival values"),
        (
            lambda c: c["baseline_survival"].update(valid_until=14.0),
            "baseline_survival.valid_until 14 is before the last time 15",
        ),
        (lambda c: c.update(created="2024-13-40T00:00:00Z"), "created '2024-13-40T00:00:00Z' is not a valid date-time"),
    ],
)
def test_semantic_problems(change, problem):
    message = model_error(change)
    assert message.startswith("model file is inconsistent: ")
    assert problem in message


def test_all_semantic_problems_are_listed_in_one_line():
    def two_problems(content):
        duplicate_first_feature(content)
        content["baseline_survival"]["survival"][5] = 0.9

    message = model_error(two_problems)
    assert message.count("; ") == 1 and "duplicate feature" in message and "must not increase" in message


def test_radiomics_only_model_is_allowed():
    assert load_changed(lambda c: c.update(clinical_covariates=[])).clinical_covariates == ()


def test_a_v2_file_without_a_domain_is_refused_under_a_schema_that_allows_it():
    # The shipped schema requires the domain for v2; the semantic check used to index None (a TypeError).
    schema = load_shipped_schema()
    del schema["if"], schema["then"]
    content = model_content_v2()
    del content["applicability_domain"]
    with pytest.raises(ModelFileError, match="schema_version 2 needs an applicability_domain"):
        FrozenModel.from_mapping(sealed_model(content), schema=schema)


def test_sd_check_does_not_rely_on_the_schema():
    schema = load_shipped_schema()
    del schema["$defs"]["feature"]["properties"]["sd"]["exclusiveMinimum"]
    content = model_content()
    content["radiomics"]["features"][0]["sd"] = -1.0
    with pytest.raises(ModelFileError, match=r"radiomics.features\[0\]: sd -1 must be > 0"):
        FrozenModel.from_mapping(sealed_model(content), schema=schema)


# --- baseline survival step function -------------------------------------------


@pytest.mark.parametrize(
    ("months", "expected"),
    [
        (0.0, 1.0),
        (0.999, 1.0),
        (1.0, 0.98),
        (1.5, 0.98),
        (4.4999, 0.9),
        (4.5, 0.82),
        (5.999, 0.82),
        (6.0, 0.7),
        (6.001, 0.7),
        (11.999, 0.5),
        (12.0, 0.35),
        (14.0, 0.35),
        (15.0, 0.3),
        (18.0, 0.3),
    ],
)
def test_baseline_is_a_right_continuous_step_function(months, expected):
    baseline = BaselineSurvival(tuple(BASELINE_TIMES), tuple(BASELINE_SURVIVAL), 18.0, 0.0)
    assert baseline.baseline_at(months) == expected


def test_baseline_matches_scikit_survival_step_function_on_its_domain():
    import numpy as np
    from sksurv.functions import StepFunction

    oracle = StepFunction(np.array(BASELINE_TIMES), np.array(BASELINE_SURVIVAL))
    baseline = BaselineSurvival(tuple(BASELINE_TIMES), tuple(BASELINE_SURVIVAL), 18.0, 0.0)
    for months in np.linspace(BASELINE_TIMES[0], BASELINE_TIMES[-1], 281):
        assert baseline.baseline_at(float(months)) == float(oracle(months))


def test_baseline_refuses_times_outside_its_validity():
    baseline = BaselineSurvival(tuple(BASELINE_TIMES), tuple(BASELINE_SURVIVAL), 18.0, 0.0)
    with pytest.raises(ValueError, match="defined for 0-18 months, not 18.5"):
        baseline.baseline_at(18.5)
    with pytest.raises(ValueError):
        baseline.baseline_at(-0.1)


def test_survival_uses_the_centred_linear_predictor():
    baseline = BaselineSurvival((6.0, 12.0), (0.8, 0.5), 12.0, 1.25)
    assert baseline.survival_at(6, 1.25) == 0.8  # lp at the centre: the baseline itself
    assert baseline.survival_at(12, 1.25 + 0.6931471805599453) == pytest.approx(0.25)  # hazard x2 -> S0^2
    assert baseline.survival_at(5, 10_000.0) == 1.0  # before the first drop, any hazard survives
    assert baseline.survival_at(6, 10_000.0) == 0.0  # exp overflows; S0 < 1 goes to 0


# --- the documentation's example ----------------------------------------------


def test_model_format_doc_example_is_a_valid_sealed_model():
    from pathlib import Path

    doc = (Path(__file__).parents[2] / "docs" / "model-format.md").read_text(encoding="utf-8")
    example = re.findall(r"```json\n(.*?)```", doc, re.S)[-1]
    model = FrozenModel.from_json(example)
    assert model.identity.name == "example-integrated-cox" and model.identity.demonstration is True
    assert model.identity.sha256 in doc


# --- clinical encodings -------------------------------------------------------------


def test_a_threshold_encoding_without_its_bound_is_refused_when_built():
    # It used to build, and then compared the field's number with None when a study was scored.
    with pytest.raises(ValueError, match="threshold encoding needs at_least"):
        Encoding(kind="threshold")
    with pytest.raises(ValueError, match="encoding kind 'thresold' is not one of"):
        Encoding(kind="thresold", at_least=2.0)
    assert Encoding(kind="threshold", at_least=2.0).encode(None, 2.0) == 1.0


def test_an_encoding_given_no_value_says_which_it_needs():
    with pytest.raises(ValueError, match="threshold encoding needs the field's number"):
        Encoding(kind="threshold", at_least=2.0).encode(None, None)
    with pytest.raises(ValueError, match="numeric encoding needs the field's number"):
        Encoding(kind="numeric").encode("x", None)
    with pytest.raises(ValueError, match="ordinal encoding needs the field's level"):
        Encoding(kind="ordinal", mapping={"a": 1.0}).encode(None, 1.0)
    assert Encoding(kind="indicator", levels=frozenset({"a"})).encode(None, None) == 0.0
