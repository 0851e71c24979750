"""scoring.training.spec on pydantic: unknown keys at any depth, wrong types, every problem reported."""

from __future__ import annotations

import pytest

from sclc_risk_node.scoring.training.spec import PreprocessingSpec, TrainingSpec, TrainingSpecError

SPEC = """
[model]
name = "m"
version = "1"
intended_use = "tests"
demonstration = true

[extraction.settings]
binWidth = 25

[extraction.image_types]
Original = {}

[lasso]
seed = 7

[[clinical.candidates]]
name = "lipi"
field = "lipi"
encoding = { kind = "ordinal", map = { good = 0, intermediate = 1, poor = 2 } }

[evaluation]
seed = 11
"""


def error_of(text: str) -> str:
    with pytest.raises(TrainingSpecError) as caught:
        TrainingSpec.from_toml(text)
    return str(caught.value)


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (
            "seed = 7",
            "seed = 7\nfolds = 3",
            "training spec has unknown key 'lasso.folds' (allowed here: alpha_min_ratio,",
        ),
        ("[lasso]", "[lasso.inner]\nx = 1\n[lasso]", "training spec has unknown key 'lasso.inner'"),
        ("binWidth = 25", "binWidth = 25\n[extraction.ring]\nwidth = 1", "unknown key 'extraction.ring.width'"),
        ("poor = 2 }", "poor = 2 }, scale = 1", "unknown key 'clinical.candidates[0].encoding.scale'"),
        ('name = "lipi"', 'name = "lipi"\nnote = "x"', "unknown key 'clinical.candidates[0].note'"),
        ("[evaluation]", "[stability]\nseeds = 1\n[evaluation]", "unknown key 'stability.seeds'"),
    ],
)
def test_an_unknown_key_anywhere_is_refused_with_its_dotted_path(old, new, expected):
    assert expected in error_of(SPEC.replace(old, new, 1))


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("seed = 7", 'seed = "7"', "training spec key 'lasso.seed' must be an integer, got '7'"),
        ("demonstration = true", 'demonstration = "no"', "key 'model.demonstration' must be true or false, got 'no'"),
        (
            "binWidth = 25",
            "binWidth = 25\n[extraction.ring]\ninward_mm = true",
            "'extraction.ring.inward_mm' must be a number, got true",
        ),
        ("good = 0", 'good = "0"', "key 'clinical.candidates[0].encoding.map.good' must be a number, got '0'"),
        (
            "[evaluation]",
            "[evaluation]\nhorizons_months = 6",
            "key 'evaluation.horizons_months' must be a non-empty array",
        ),
        (
            "[extraction.settings]\nbinWidth = 25",
            "[extraction]\nsettings = 3",
            "key 'extraction.settings' must be a table, got 3",
        ),
    ],
)
def test_a_wrong_type_names_the_key_and_the_value(old, new, expected):
    assert expected in error_of(SPEC.replace(old, new, 1))


def test_every_problem_is_reported():
    text = SPEC.replace("seed = 7", 'seed = 7\nselection = "best"').replace("seed = 11", "seed = 11\nbootstrap = 3")
    message = error_of(text.replace('version = "1"', 'version = "1"\nauthor = "x"'))
    assert message.split("; ") == [
        "training spec has unknown key 'model.author' (allowed here: demonstration, intended_use, name, version)",
        "training spec key 'lasso.selection' is 'best' (allowed: min, 1se)",
        "training spec key 'evaluation.bootstrap' is 3 (must be >= 10)",
    ]


def test_defaults_and_seeds_and_round_trip():
    spec = TrainingSpec.from_toml(SPEC)
    assert (spec.stability.seed, spec.validation.seed) == (7, 11)  # the LASSO and the evaluation seed
    assert spec.preprocessing == PreprocessingSpec()
    assert TrainingSpec.from_mapping(spec.to_mapping()) == spec
