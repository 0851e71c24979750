"""The training report draws what the fit recorded (no refit for a figure)."""

from __future__ import annotations

import numpy as np

from sclc_risk_node.research.report import lasso_path_figure
from tests.scoring.test_training_method import cohort, fitted, spec  # noqa: F401 (fixtures)


def test_the_drawn_lasso_path_is_the_fitted_path(fitted):
    path = fitted.diagnostics["lasso"]["coefficient_path"]
    selected = [feature["name"] for feature in fitted.diagnostics["lasso"]["selected_features"]]
    figure = lasso_path_figure(path, selected)
    [ax] = figure.axes
    curves = [line for line in ax.get_lines() if len(line.get_xdata()) == len(path["alphas"])]
    assert len(curves) == len(path["features"]) >= len(selected) > 0
    for line, values in zip(curves, path["features"].values()):
        np.testing.assert_array_equal(line.get_xdata(), np.log(path["alphas"]))
        np.testing.assert_array_equal(line.get_ydata(), values)
    drawn_in_colour = {line.get_label() for line in curves if line.get_color() != "#cccccc"}
    assert drawn_in_colour == set(selected)


def test_train_scores_every_patient_once_and_reuses_the_scores(monkeypatch):
    """The split evaluation, its at-risk tables and the treatment comparison share one scoring per patient."""
    from dataclasses import dataclass

    from sclc_risk_node.research.training_cli import _ScoreOnce
    from sclc_risk_node.scoring.training import evaluation
    from sclc_risk_node.scoring.training.evaluation import score_patients
    from sclc_risk_node.scoring.training.method import fit_integrated_model
    from sclc_risk_node.scoring.training.spec import TrainingSpec
    from tests.scoring.test_training_method import N_TRAIN, SPEC_TOML, simulate_cohort

    features, records, time, event = simulate_cohort()
    model = fit_integrated_model(
        features.iloc[:N_TRAIN], records[:N_TRAIN], time[:N_TRAIN], event[:N_TRAIN], TrainingSpec.from_toml(SPEC_TOML)
    ).frozen_model()

    @dataclass(frozen=True)
    class Patient:
        id: str
        clinical: object

    patients = [Patient(str(i), record) for i, record in zip(features.index, records)]
    expected = score_patients(model, features, records)
    calls = []
    real = evaluation.apply_model
    monkeypatch.setattr(evaluation, "apply_model", lambda *args: calls.append(args) or real(*args))
    once = _ScoreOnce(model, features.set_axis([p.id for p in patients]))
    held_out, control = patients[N_TRAIN:], patients[N_TRAIN + 20 :]
    first = once.of(held_out)
    again = once.of(control)  # already scored with the held-out split
    assert len(calls) == len(held_out)
    np.testing.assert_array_equal(first.risk, expected.risk[N_TRAIN:])
    np.testing.assert_array_equal(first.radiomics, expected.radiomics[N_TRAIN:])
    np.testing.assert_array_equal(again.risk, expected.risk[N_TRAIN + 20 :])
