"""scoring.training.stats against published R `survival` output on public data sets.

Data:
* NCCTG lung cancer data (R `survival::lung`), from the lifelines wheel's
  `lifelines/datasets/lung.csv` (read as a file; lifelines is in the `test` extra).
  There `status` is already recoded to 0 = censored / 1 = dead (R ships 1/2).
* VA lung cancer trial (R `survival::veteran`), from
  `sksurv.datasets.load_veterans_lung_cancer`.

Every expected number below is copied from a published R printout, never from
this code; `r_value("0.017045")` turns the printed text into the value and a
tolerance of half a unit in its last printed digit.  The sources:

[SURV-EX]  R survival package, tests/Examples/survival-Ex.Rout.save (R's own
           saved output of the help-page examples; github.com/therneau/survival,
           commit 0457202d5ac17d52e0243fe933275c6c29ec1d72): summary.coxph example
           `summary(coxph(Surv(time, status) ~ age + sex, lung))`; pspline example
           `coxph(Surv(time, status) ~ ph.ecog + age, lung)`; Surv and pseudo
           examples `survfit(Surv(time, status) ~ ph.ecog, data=lung)`; survSplit
           example `coef(coxph(Surv(time, status) ~ karno + age + trt, veteran))`.
[SURV-Q]   R survival package, tests/quantile.Rout.save (github.com/therneau/survival,
           commit 5395b8a9b6193eaaa635b6a2d1912ac8ad0fcb9a): medians and limits of
           `survfit(Surv(time, status) ~ 1 / ~ x, test1)`.
[STHDA-COX] STHDA, "Cox Proportional-Hazards Model"
           (http://www.sthda.com/english/wiki/cox-proportional-hazards-model):
           `summary(coxph(Surv(time, status) ~ sex, data = lung))` and
           `~ age + sex + ph.ecog`; the printout is reproduced verbatim in several
           public R notebooks.
[PBOOT]    parametricboot R package documentation
           (https://diogoribeiro7.github.io/parametricboot/): for
           `coxph(Surv(time, status) ~ age + sex + ph.ecog, data = lung)` the
           estimates to 8 digits and `sqrt(diag(vcov(cox)))` to 9 digits.
[STHDA-KM] STHDA, "Survival Analysis Basics"
           (http://www.sthda.com/english/wiki/survival-analysis-basics):
           `print(survfit(Surv(time, status) ~ sex, data = lung))`; the same
           printout, and `survfit(Surv(time, status) ~ 1, data = lung)`
           (228 165 310 285 363), appear verbatim in many public R tutorials.
[PACKT]    Machine Learning with R Cookbook, 2nd ed. (Packt), "Using the log-rank
           test" (https://www.staging.packtpub.com/en-gb/product/machine-learning-with-r-cookbook-second-edition-9781787284395/chapter/survival-analysis-6/section/using-the-log-rank-test-ch06lvl1sec69):
           `survdiff(Surv(time, status) ~ sex)` on lung with N, Observed,
           Expected, (O-E)^2/V and p to 6 significant digits.
[RVIEWS]   J. Rickert, "Survival Analysis with R", R Views, 2017-09-25
           (https://rviews.rstudio.com/2017/09/25/survival-analysis-with-r/):
           `summary(coxph(Surv(time, status) ~ trt + celltype + karno + diagtime
           + age + prior, data = veteran))`.
[VA-TRT]   "Cox PH" course slides (https://dathomas1.github.io/STA6257_finished_coxph/slides):
           `summary(coxph(Surv(stime, status) ~ treat, data = VA))` (MASS::VA is
           the veteran trial, 137 patients / 128 events).
[VA-KM]    `print(survfit(Surv(time, status) ~ trt, data = veteran))`
           (trt=1 69 64 103.0 59 132; trt=2 68 64 52.5 44 95), reproduced
           verbatim in several public R course notes and tutorials.
"""

from __future__ import annotations

import importlib.util
import re
from decimal import Decimal
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sclc_risk_node.scoring.errors import InputError
from sclc_risk_node.scoring.training.stats import (
    CoxFitError,
    SurvivalDataError,
    cox_fit,
    cox_information,
    kaplan_meier,
    logrank,
)


def r_value(printed: str) -> tuple[float, float]:
    """A number as R printed it -> (value, half a unit in its last printed digit)."""
    exponent = Decimal(printed.strip()).as_tuple().exponent
    return float(printed), 0.5 * 10.0**exponent + 1e-12


def assert_r(actual: float, printed: str, what: str = "") -> None:
    expected, tolerance = r_value(printed)
    assert abs(actual - expected) <= tolerance, f"{what}: {actual!r} is not R's {printed} (+/- {tolerance:g})"


def lung_csv_path() -> Path:
    spec = importlib.util.find_spec("lifelines")  # locates the wheel without importing lifelines
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("lifelines (test extra) is not installed: no lung.csv")
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "lung.csv"


@pytest.fixture(scope="module")
def lung() -> pd.DataFrame:
    return pd.read_csv(lung_csv_path())


@pytest.fixture(scope="module")
def veteran() -> pd.DataFrame:
    """R's `veteran` columns: trt 1/2, celltype dummies (reference squamous), prior 0/10."""
    from sksurv.datasets import load_veterans_lung_cancer

    x, y = load_veterans_lung_cancer()
    return pd.DataFrame(
        {
            "time": y["Survival_in_days"],
            "status": y["Status"],
            "trt": np.where(x["Treatment"] == "test", 2, 1),
            "smallcell": (x["Celltype"] == "smallcell").astype(int),
            "adeno": (x["Celltype"] == "adeno").astype(int),
            "large": (x["Celltype"] == "large").astype(int),
            "karno": x["Karnofsky_score"],
            "diagtime": x["Months_from_Diagnosis"],
            "age": x["Age_in_years"],
            "prior": np.where(x["Prior_therapy"] == "yes", 10, 0),
        }
    )


def check_rows(result, expected: dict[str, dict[str, str]]) -> None:
    for name, fields in expected.items():
        c = result.coefficients[name]
        for field, printed in fields.items():
            assert_r(getattr(c, field), printed, f"{name}.{field}")


# ------------------------------------------------------------------ Cox model vs R


def test_cox_lung_age_sex_matches_r_summary(lung):
    # [SURV-EX] summary(coxph(Surv(time, status) ~ age + sex, lung))
    result = cox_fit(lung, "time", "status", ["age", "sex"])
    assert (result.n, result.events, result.n_dropped) == (228, 165, 0)
    check_rows(
        result,
        {
            "age": {
                "coef": "0.017045",
                "hr": "1.017191",
                "se": "0.009223",
                "z": "1.848",
                "p": "0.06459",
                "ci_low": "0.9990",
                "ci_high": "1.0357",
            },
            "sex": {
                "coef": "-0.513219",
                "hr": "0.598566",
                "se": "0.167458",
                "z": "-3.065",
                "p": "0.00218",
                "ci_low": "0.4311",
                "ci_high": "0.8311",
            },
        },
    )
    assert_r(result.concordance, "0.603", "concordance")


def test_cox_drops_rows_with_missing_covariates_like_r(lung):
    # [SURV-EX] coxph(Surv(time, status) ~ ph.ecog + age, lung): n= 227, 164 events, 1 deleted
    result = cox_fit(lung, "time", "status", ["ph.ecog", "age"])
    assert (result.n, result.events, result.n_dropped) == (227, 164, 1)
    check_rows(
        result,
        {
            "ph.ecog": {"coef": "0.443485", "hr": "1.558128", "se": "0.115831", "z": "3.829", "p": "0.000129"},
            "age": {"coef": "0.011281", "hr": "1.011345", "se": "0.009319", "z": "1.211", "p": "0.226082"},
        },
    )


def test_cox_lung_age_sex_ecog_matches_r(lung):
    result = cox_fit(lung, "time", "status", ["age", "sex", "ph.ecog"])
    assert (result.n, result.events) == (227, 164)
    check_rows(
        result,
        {  # [PBOOT] estimates and sqrt(diag(vcov))
            "age": {"coef": "0.01106676", "se": "0.009267411"},
            "sex": {"coef": "-0.55261240", "se": "0.167739054"},
            "ph.ecog": {"coef": "0.46372848", "se": "0.113577266"},
        },
    )
    check_rows(
        result,
        {  # [STHDA-COX]
            "age": {"hr": "1.011128", "z": "1.194", "p": "0.232416", "ci_low": "0.9929", "ci_high": "1.0297"},
            "sex": {"hr": "0.575445", "z": "-3.294", "p": "0.000986", "ci_low": "0.4142", "ci_high": "0.7994"},
            "ph.ecog": {"hr": "1.589991", "z": "4.083", "p": "4.45e-05", "ci_low": "1.2727", "ci_high": "1.9864"},
        },
    )
    assert_r(result.concordance, "0.637", "concordance")


def test_cox_concordance_with_tied_risk_scores(lung):
    # [STHDA-COX] summary(coxph(Surv(time, status) ~ sex, data = lung)): a binary
    # covariate, so most pairs are tied on the risk score and count 1/2.
    result = cox_fit(lung, "time", "status", ["sex"])
    check_rows(
        result,
        {
            "sex": {
                "coef": "-0.5310",
                "hr": "0.5880",
                "se": "0.1672",
                "z": "-3.176",
                "p": "0.00149",
                "ci_low": "0.4237",
                "ci_high": "0.816",
            }
        },
    )
    assert_r(result.concordance, "0.579", "concordance")


def test_cox_veteran_karno_coefficient_to_nine_digits(veteran):
    # [SURV-EX] coef(coxph(Surv(time, status) ~ karno + age + trt, veteran))[1]
    result = cox_fit(veteran, "time", "status", ["karno", "age", "trt"])
    assert_r(result.coefficients["karno"].coef, "-0.034443897", "karno")


def test_cox_veteran_full_model_matches_r(veteran):
    # [RVIEWS] trt + celltype + karno + diagtime + age + prior; n= 137, events= 128
    covariates = ["trt", "smallcell", "adeno", "large", "karno", "diagtime", "age", "prior"]
    result = cox_fit(veteran, "time", "status", covariates)
    assert (result.n, result.events) == (137, 128)
    check_rows(
        result,
        {
            "trt": {
                "coef": "2.946e-01",
                "se": "2.075e-01",
                "z": "1.419",
                "p": "0.15577",
                "ci_low": "0.8939",
                "ci_high": "2.0166",
            },
            "smallcell": {
                "coef": "8.616e-01",
                "se": "2.753e-01",
                "z": "3.130",
                "p": "0.00175",
                "ci_low": "1.3799",
                "ci_high": "4.0597",
            },
            "adeno": {
                "coef": "1.196e+00",
                "se": "3.009e-01",
                "z": "3.975",
                "p": "7.05e-05",
                "ci_low": "1.8336",
                "ci_high": "5.9647",
            },
            "large": {"coef": "4.013e-01", "se": "2.827e-01", "z": "1.420", "p": "0.15574"},
            "karno": {"coef": "-3.282e-02", "se": "5.508e-03", "z": "-5.958", "p": "2.55e-09"},
            "diagtime": {"coef": "8.132e-05", "se": "9.136e-03", "z": "0.009", "p": "0.99290"},
            "age": {"coef": "-8.706e-03", "se": "9.300e-03", "z": "-0.936", "p": "0.34920"},
            "prior": {"coef": "7.159e-03", "se": "2.323e-02", "z": "0.308", "p": "0.75794"},
        },
    )


def test_cox_veteran_treatment_only(veteran):
    # [VA-TRT] treat2 0.01774 1.01790 0.18066 0.098 0.922; CI 0.7144-1.45; Concordance= 0.525
    data = veteran.assign(treat2=veteran["trt"] - 1)
    result = cox_fit(data, "time", "status", ["treat2"])
    check_rows(
        result,
        {
            "treat2": {
                "coef": "0.01774",
                "hr": "1.01790",
                "se": "0.18066",
                "z": "0.098",
                "p": "0.922",
                "ci_low": "0.7144",
                "ci_high": "1.45",
            }
        },
    )
    assert_r(result.concordance, "0.525", "concordance")


@pytest.mark.parametrize("ties", ["efron", "breslow"])
def test_information_matrix_equals_scikit_survival_hessian(lung, ties):
    """Our variance function against scikit-survival's own (internal) Newton-Raphson Hessian."""
    from sksurv.linear_model.coxph import CoxPHOptimizer

    data = lung.dropna(subset=["ph.ecog"])
    x = data[["age", "sex", "ph.ecog"]].to_numpy(float)
    x -= x.mean(axis=0)
    time, event = data["time"].to_numpy(float), data["status"].to_numpy(bool)
    beta = np.array([0.01, -0.5, 0.45])
    optimizer = CoxPHOptimizer(x, event, time, np.zeros(3), ties)
    optimizer.update(beta)
    np.testing.assert_allclose(cox_information(x, time, event, beta, ties), optimizer.hessian * len(time), rtol=1e-10)


def test_cox_result_as_dict_is_the_cli_json_shape(lung):
    payload = cox_fit(lung, "time", "status", ["age", "sex"]).as_dict()
    assert set(payload) >= {"coefficients", "concordance", "n", "events"}
    assert list(payload["coefficients"]) == ["age", "sex"]
    assert set(payload["coefficients"]["sex"]) >= {"coef", "hr", "ci_low", "ci_high", "p"}


# ------------------------------------------------------------------ Kaplan-Meier vs R


def check_km(group: dict, n: int, events: int, median: str | None, low: str | None, high: str | None) -> None:
    assert (group["n"], group["events"]) == (n, events)
    for key, printed in (("median", median), ("ci_low", low), ("ci_high", high)):
        if printed is None:
            assert group[key] is None, f"{key} should be NA"
        else:
            assert_r(group[key], printed, key)


def test_km_lung_by_sex(lung):
    # [STHDA-KM] sex=1 138 112 270 212 310; sex=2 90 53 426 348 550
    result = kaplan_meier(lung, "time", "status", "sex")
    assert list(result["groups"]) == ["1", "2"]
    check_km(result["groups"]["1"], 138, 112, "270", "212", "310")
    check_km(result["groups"]["2"], 90, 53, "426", "348", "550")
    assert result["n_dropped"] == 0


def test_km_lung_overall_is_group_all(lung):
    # [STHDA-KM] survfit(Surv(time, status) ~ 1, data = lung): 228 165 310 285 363
    result = kaplan_meier(lung, "time", "status")
    assert list(result["groups"]) == ["all"]
    check_km(result["groups"]["all"], 228, 165, "310", "285", "363")


def test_km_lung_by_ecog_with_missing_group_and_single_patient(lung):
    # [SURV-EX] 1 observation deleted due to missingness; ph.ecog=3 has n=1: NA limits
    result = kaplan_meier(lung, "time", "status", "ph.ecog")
    assert result["n_dropped"] == 1
    groups = result["groups"]
    assert list(groups) == ["0", "1", "2", "3"]
    check_km(groups["0"], 63, 37, "394", "348", "574")
    check_km(groups["1"], 113, 82, "306", "268", "429")
    check_km(groups["2"], 50, 44, "199", "156", "288")
    check_km(groups["3"], 1, 1, "118", None, None)


def test_km_midpoint_rule_when_curve_sits_at_one_half(veteran):
    # [VA-KM] trt=2: the curve is exactly 0.5 between two deaths -> median 52.5
    groups = kaplan_meier(veteran, "time", "status", "trt")["groups"]
    check_km(groups["1"], 69, 64, "103.0", "59", "132")
    check_km(groups["2"], 68, 64, "52.5", "44", "95")


@pytest.fixture
def r_quantile_test1() -> pd.DataFrame:
    # [SURV-Q] test1: the NA status row is dropped by survfit
    return pd.DataFrame(
        {
            "time": [9, 3, 1, 1, 6, 6, 8, 10],
            "status": [1, None, 1, 0, 1, 1, 0, 0],
            "x": [0, 2, 1, 1, 1, 0, 0, 0],
        }
    )


def test_km_median_limits_match_r_quantile_tests(r_quantile_test1):
    # [SURV-Q] quantile(fit2, .5): 9, lower 6, upper NA; by x: (9, 6, NA) and (6, 1, NA)
    overall = kaplan_meier(r_quantile_test1, "time", "status")
    assert overall["n_dropped"] == 1
    check_km(overall["groups"]["all"], 7, 4, "9", "6", None)
    by_x = kaplan_meier(r_quantile_test1, "time", "status", "x")["groups"]
    assert list(by_x) == ["0", "1"]
    check_km(by_x["0"], 4, 2, "9", "6", None)
    check_km(by_x["1"], 3, 2, "6", "1", None)


def test_km_median_not_reached_is_none():
    data = pd.DataFrame({"t": [1, 2, 3, 4, 5, 6], "e": [1, 0, 0, 0, 0, 0]})
    group = kaplan_meier(data, "t", "e")["groups"]["all"]
    assert group["median"] is None and group["ci_low"] is None and group["ci_high"] is None


# ------------------------------------------------------------------ log-rank vs R


def test_logrank_lung_by_sex(lung):
    # [PACKT] N 138/90, Observed 112/53, Expected 91.5817/73.4183, (O-E)^2/V 10.3267,
    # Chisq= 10.3 on 1 degrees of freedom, p= 0.00131116
    result = logrank(lung, "time", "status", "sex")
    assert result["df"] == 1
    assert_r(result["chi2"], "10.3267", "chi2")
    assert_r(result["p"], "0.00131116", "p")
    assert result["groups"]["1"]["n"] == 138 and result["groups"]["1"]["observed"] == 112
    assert result["groups"]["2"]["n"] == 90 and result["groups"]["2"]["observed"] == 53
    assert_r(result["groups"]["1"]["expected"], "91.5817", "expected 1")
    assert_r(result["groups"]["2"]["expected"], "73.4183", "expected 2")


def test_logrank_needs_two_groups(lung):
    with pytest.raises(SurvivalDataError, match="'one'.*single group"):
        logrank(lung.assign(one="a"), "time", "status", "one")


# ------------------------------------------------------------------ input conventions


@pytest.mark.parametrize(
    "coding",
    [
        pytest.param({0: False, 1: True}, id="bool"),
        pytest.param({0: "false", 1: "TRUE"}, id="true/false"),
        pytest.param({0: "no", 1: "Yes"}, id="yes/no"),
        pytest.param({0: 0.0, 1: 1.0}, id="float"),
        pytest.param({0: "0", 1: "1"}, id="text 0/1"),
    ],
)
def test_event_codings_are_equivalent(lung, coding):
    recoded = lung.assign(status=lung["status"].map(coding).astype(object))
    reference = cox_fit(lung, "time", "status", ["age", "sex"])
    result = cox_fit(recoded, "time", "status", ["age", "sex"])
    assert result.coefficients["sex"].coef == pytest.approx(reference.coefficients["sex"].coef, abs=1e-12)
    assert kaplan_meier(recoded, "time", "status", "sex") == kaplan_meier(lung, "time", "status", "sex")


def test_r_style_one_two_status_is_refused_with_column_and_value(lung):
    r_coded = lung.assign(status=lung["status"] + 1)  # R's lung: 1 = censored, 2 = dead
    with pytest.raises(SurvivalDataError) as excinfo:
        cox_fit(r_coded, "time", "status", ["age"])
    message = str(excinfo.value)
    assert "'status'" in message and "value 2" in message and "1/2" in message
    assert "\n" not in message
    assert isinstance(excinfo.value, InputError)


@pytest.mark.parametrize(("bad", "shown"), [("maybe", "'maybe'"), (3, "3"), (-1, "-1"), (0.5, "0.5")])
def test_non_binary_event_value_is_named(bad, shown):
    data = pd.DataFrame({"t": [1.0, 2.0, 3.0], "dead": [1, bad, 0]})
    with pytest.raises(SurvivalDataError, match=re.escape(f"event column 'dead': value {shown} is not")):
        kaplan_meier(data, "t", "dead")


def test_unknown_column_is_named(lung):
    with pytest.raises(SurvivalDataError, match=r"column 'ecog' not found"):
        cox_fit(lung, "time", "status", ["age", "ecog"])
    with pytest.raises(SurvivalDataError, match=r"column 'days' not found"):
        kaplan_meier(lung, "days", "status")
    with pytest.raises(SurvivalDataError, match=r"column 'arm' not found"):
        logrank(lung, "time", "status", "arm")


def test_missing_values_and_blank_strings_are_dropped():
    data = pd.DataFrame(
        {
            "t": [5, 8, 12, np.nan, 20, 25, 30],
            "e": [1, 1, 0, 1, " ", 1, 1],
            "g": ["a", "b", "a", "b", "a", None, "b"],
        }
    )
    result = kaplan_meier(data, "t", "e", "g")
    assert result["n_dropped"] == 3
    assert {k: v["n"] for k, v in result["groups"].items()} == {"a": 2, "b": 2}


def test_bad_times_and_covariates_are_named():
    base = pd.DataFrame({"t": [1.0, 2.0, 3.0, 4.0], "e": [1, 0, 1, 1], "x": [1.0, 2.0, 0.5, 3.0]})
    with pytest.raises(SurvivalDataError, match=r"time column 't': value -2 is negative"):
        kaplan_meier(base.assign(t=[1.0, -2.0, 3.0, 4.0]), "t", "e")
    with pytest.raises(SurvivalDataError, match=r"time column 't': value 'soon' is not a number"):
        kaplan_meier(base.assign(t=["1", "soon", "3", "4"]), "t", "e")
    with pytest.raises(SurvivalDataError, match=r"covariate column 'x': value 'IIIb' is not a number.*dummy"):
        cox_fit(base.assign(x=["1", "IIIb", "2", "3"]), "t", "e", ["x"])


def test_unestimable_models_raise_cox_fit_error():
    data = pd.DataFrame(
        {
            "t": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
            "e": [1, 0, 1, 1, 0, 1],
            "a": [1.0, 2.0, 3.0, 1.0, 2.0, 5.0],
            "k": [7.0] * 6,
        }
    )
    with pytest.raises(CoxFitError, match=r"covariate 'k' is constant"):
        cox_fit(data, "t", "e", ["a", "k"])
    with pytest.raises(CoxFitError, match=r"collinear"):
        cox_fit(data.assign(b=2 * data["a"] + 1), "t", "e", ["a", "b"])
    with pytest.raises(SurvivalDataError, match=r"no events"):
        cox_fit(data.assign(e=0), "t", "e", ["a"])
    with pytest.raises(SurvivalDataError, match=r"'a' is listed more than once"):
        cox_fit(data, "t", "e", ["a", "a"])
    # every event has x = 1 and every censored subject x = 0: R warns "coefficient may be infinite"
    separated = pd.DataFrame({"t": [1, 2, 3, 4, 5, 6], "e": [1, 1, 1, 0, 0, 0], "x": [1, 1, 1, 0, 0, 0]})
    with pytest.raises(CoxFitError, match=r"covariate 'x': the coefficient may be infinite"):
        cox_fit(separated, "t", "e", ["x"])


def test_all_messages_are_one_line(lung):
    calls = [
        lambda: cox_fit(lung, "time", "status", ["nope"]),
        lambda: cox_fit(lung.assign(status=2), "time", "status", ["age"]),
        lambda: kaplan_meier(lung.assign(time=np.nan), "time", "status"),
    ]
    for call in calls:
        with pytest.raises(InputError) as excinfo:
            call()
        assert str(excinfo.value) and "\n" not in str(excinfo.value)


# --------------------------------------------------------------------------- Harrell's C: one implementation


def test_harrell_c_is_scikit_survivals_on_the_lung_data_in_every_caller(lung):
    """One Harrell's C (scoring.training.stats.harrell_c) for the fit, the CV folds, the evaluation and the
    internal validation, equal to scikit-survival's concordance_index_censored on real data (ties included)."""
    from sksurv.metrics import concordance_index_censored

    from sclc_risk_node.scoring.training import evaluation, method, validation
    from sclc_risk_node.scoring.training.stats import harrell_c, survival_y

    data = lung.dropna(subset=["ph.ecog", "age"])
    time = data["time"].to_numpy(dtype=float)
    event = data["status"].to_numpy() == 1  # lifelines recodes R's 1/2 as 0/1
    for score in (data["age"].to_numpy(dtype=float), data["ph.ecog"].to_numpy(dtype=float)):
        expected = concordance_index_censored(event, time, score)[0]
        assert 0.5 < expected < 0.7
        assert harrell_c(time, event, score) == expected
        assert method.LassoCoxSelector._fold_c_index(time, event, score) == expected
        assert evaluation.bootstrap_c_index(time, event, {"s": score}, resamples=2, seed=1)["s"]["estimate"] == expected
        assert validation._harrell_c(time, event, score) == expected
    y = survival_y(time, event)
    assert y.dtype.names == ("event", "time")
    assert (y["event"] == event).all() and (y["time"] == time).all()
    # Undefined, not a number: every patient censored.
    assert harrell_c(time, np.zeros(len(time), dtype=bool), time) is None
    for module in (method, evaluation, validation):
        assert not hasattr(module, "_survival_y")
    assert not hasattr(method, "_harrell_c") and not hasattr(evaluation, "_harrell_c")
