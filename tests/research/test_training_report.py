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
