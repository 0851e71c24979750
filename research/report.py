"""The training report: ``report.json``, PNG figures, one self-contained ``report.html`` and the model card.

`write_report(report_dir, report, model_mapping=...)` takes the run's data as
assembled by `research.training_cli.run_training` (plain JSON data, see below),
draws the figures with matplotlib's Agg canvas (no display, no pyplot state),
and writes into ``report_dir``::

    report.json        the data below, plus "figures" and "files"
    report.html        tables (the paper's Table 3 and more) and every figure, embedded
                       as base64 data URIs: one file, no external link or resource
    model-card.md      `research.model_card.render_model_card`
    figures/*.png      the figures (the folder is emptied of PNGs first)

``report.json`` top-level keys (`REPORT_KEYS`): ``report_format``, ``created``,
``software``, ``inputs``, ``model``, ``spec``, ``cohort``, ``extraction``,
``training``, ``splits``, ``predictive``, ``warnings``, ``timings_seconds``, ``figures``,
``files``.  ``training`` also holds ``stability`` (the perturbation screen:
settings and every feature's ICC), ``log_transform`` and ``transforms`` (which
features were log-transformed), and ``internal_validation`` (``bootstrap``:
Harrell's optimism-corrected C-index and calibration slope;
``proportional_hazards``: the Grambsch-Therneau test per term).
``predictive`` is the paper's Figure 7 (treated risk groups vs the ``control``
split, and the risk-group x treatment interaction; None without a control
split); ``extraction.stability`` counts the perturbed re-extractions.
Each entry of ``splits`` (keyed by split name, cohort order: train, the
validation sets, control) has `SPLIT_KEYS`: ``split``, ``n`` (patients of the
split in the cohort), ``n_used`` (patients evaluated), ``events`` (among them),
``excluded`` (``[{row, reason}]``: CSV line and why), ``evaluation``
(`scoring.training.evaluation.SplitEvaluation.as_dict`, or None), ``error``
(why the split could not be evaluated, or None), ``at_risk`` (numbers at risk
per risk group at the Kaplan-Meier time ticks, per model) and
``overall_survival`` (Kaplan-Meier of OS by integrated risk group when every
evaluated patient has OS in the CSV, else None).

Patients are named by their CSV line (``row``), never by ``id``: ids may be
hospital identifiers and the report is meant to be shared.

Figures (`FIGURE_KINDS`): the LASSO cross-validation curve and coefficient
path, forest plots of the univariate, multivariate and integrated Cox models,
the C-index of every split, and per split: Kaplan-Meier PFS by radiomics and
by integrated risk group (median, HR and log-rank p in the legend, numbers at
risk below), discrimination (C-index with 95% CI and time-dependent AUC at each
horizon; the evaluation gives AUC values, not ROC curve points, so these are
bars), calibration and decision curves at each horizon, and Kaplan-Meier OS
by integrated risk group when OS is available; the ICC of every candidate in
the stability screen against its threshold; and, with a control split,
Kaplan-Meier PFS (and OS) of high-risk treated, low-risk treated and control
patients (the paper's Figure 7).
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from sclc_risk_node.node.files import write_atomically

__all__ = [
    "FIGURE_KINDS",
    "REPORT_FORMAT",
    "REPORT_KEYS",
    "SPLIT_KEYS",
    "ReportFiles",
    "at_risk_table",
    "lasso_path_figure",
    "time_ticks",
    "write_report",
]

REPORT_FORMAT = 1
REPORT_KEYS = (
    "report_format",
    "created",
    "software",
    "inputs",
    "model",
    "spec",
    "cohort",
    "extraction",
    "training",
    "splits",
    "predictive",
    "warnings",
    "timings_seconds",
    "figures",
    "files",
)
SPLIT_KEYS = ("split", "n", "n_used", "events", "excluded", "evaluation", "error", "at_risk", "overall_survival")
FIGURE_KINDS = (
    "lasso-cv",
    "lasso-path",
    "forest-univariate",
    "forest-multivariate",
    "forest-integrated",
    "c-index",
    "km",
    "discrimination",
    "calibration",
    "decision-curve",
    "km-os",
    "stability-icc",
    "km-predictive",
)
MODELS = ("radiomics", "integrated")
MODEL_LABELS = {"radiomics": "Radiomics model", "integrated": "Integrated model"}
MODEL_COLOURS = {"radiomics": "#e08214", "integrated": "#2166ac"}
GROUP_COLOURS = {"low": "#1a7837", "high": "#c51b7d"}
GROUP_LABELS = {"low": "Low risk", "high": "High risk"}
DPI = 110
FIGURES_FOLDER = "figures"


@dataclass(frozen=True)
class ReportFiles:
    json: Path
    html: Path
    model_card: Path
    figures: tuple[Path, ...]


# --------------------------------------------------------------------------- formatting


def _num(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "NA"
    return f"{value:.{digits}f}"


def _p(value: Any) -> str:
    if value is None:
        return "NA"
    return "<0.001" if value < 0.001 else f"{value:.3f}"


def _p_with_sign(value: Any) -> str:
    text = _p(value)
    return f"p{text}" if text.startswith("<") else f"p={text}"


def _ci(estimate: Any, low: Any, high: Any, digits: int = 3) -> str:
    if estimate is None:
        return "NA"
    if low is None and high is None:
        return f"{_num(estimate, digits)} (CI NA)"
    return f"{_num(estimate, digits)} ({_num(low, digits)}–{_num(high, digits)})"


def _median(group: Mapping[str, Any] | None) -> str:
    """Median PFS with its 95% CI as the paper prints it: NR where the curve does not reach it."""
    if not group or not group.get("n"):
        return "NA"

    def months(value):
        return "NR" if value is None else f"{value:.1f}"

    if group.get("median") is None and group.get("ci_low") is None:
        return "NR"
    return f"{months(group.get('median'))} ({months(group.get('ci_low'))}–{months(group.get('ci_high'))})"


def _hr(block: Mapping[str, Any] | None) -> str:
    if not block:
        return "NA"
    return f"{_num(block['hr'], 2)} ({_num(block['ci_low'], 2)}–{_num(block['ci_high'], 2)})"


# --------------------------------------------------------------------------- data helpers (used by the CLI)


def time_ticks(max_time: float) -> list[float]:
    """Kaplan-Meier x-axis ticks in months: every 3 months up to 24, every 6 beyond (paper style)."""
    step = 3.0 if max_time <= 24 else 6.0
    count = int(math.ceil(max_time / step - 1e-9)) + 1
    return [step * k for k in range(max(count, 2))]


def at_risk_table(time: ArrayLike, high: ArrayLike, ticks: Sequence[float]) -> dict[str, list[float] | list[int]]:
    """Numbers at risk (time >= tick) in the low and high group at each tick."""
    months = np.asarray(time, dtype=float)
    is_high = np.asarray(high, dtype=bool)
    return {
        "ticks": [float(t) for t in ticks],
        "low": [int(np.sum((months >= t) & ~is_high)) for t in ticks],
        "high": [int(np.sum((months >= t) & is_high)) for t in ticks],
    }


# --------------------------------------------------------------------------- figures


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=DPI, metadata={"Software": None})
    return path


def _note(ax, text: str) -> None:
    """An empty panel that says why it is empty."""
    import textwrap

    wrapped = "\n".join(textwrap.fill(line, 52) for line in text.splitlines())
    ax.text(0.5, 0.5, wrapped, ha="center", va="center", fontsize=9, color="#555555", transform=ax.transAxes)
    ax.axis("off")


def _reasons_text(reasons: Sequence[tuple[str, str]]) -> str:
    """``[(model, reason)]`` as lines, a reason shared by both models said once."""
    distinct = list(dict.fromkeys(reason for _, reason in reasons))
    if len(distinct) == 1 and len(reasons) == len(MODELS):
        return f"Not available: {distinct[0]}"
    return "\n".join(f"{MODEL_LABELS[model]}: {reason}" for model, reason in reasons)


def _pretty_split(split: str) -> str:
    if split == "train":
        return "Training set"
    if split == "control":
        return "Control group"
    if split == "validation":
        return "Validation set"
    return "Validation set " + split.removeprefix("validation_").replace("_", " ")


def _km_step(ax, curve: Mapping[str, Any], colour: str, label: str) -> None:
    times = list(curve["time"])
    survival = list(curve["survival"])
    last_censor = max(curve.get("censored_time") or [0.0])
    if last_censor > times[-1]:
        times.append(last_censor)
        survival.append(survival[-1])
    ax.step(times, survival, where="post", color=colour, linewidth=1.8, label=label)
    if curve.get("censored_time"):
        ax.plot(
            curve["censored_time"],
            curve["censored_survival"],
            linestyle="none",
            marker="|",
            markersize=8,
            markeredgewidth=1.3,
            color=colour,
        )


def _km_panel(
    ax,
    table_ax,
    block: Mapping[str, Any] | None,
    at_risk: Mapping[str, Any] | None,
    title: str,
    endpoint: str,
    ticks: Sequence[float],
) -> None:
    ax.set_title(title, fontsize=11)
    if block is None:
        _note(ax, "not available")
        table_ax.axis("off")
        return
    groups = block["groups"]
    for label in ("low", "high"):
        group = groups[label]
        if not group.get("n") or group.get("curve") is None:
            continue
        legend = f"{GROUP_LABELS[label]} (n={group['n']}): m{endpoint} {_median(group)} m"
        _km_step(ax, group["curve"], GROUP_COLOURS[label], legend)
    hr = block.get("hazard_ratio_low_vs_high")
    logrank = block.get("logrank")
    hr_text = f"HR (low vs high) {_hr(hr)}" if hr else "HR not estimable (see report)"
    summary = f"{hr_text}\nlog-rank {_p_with_sign(logrank['p'])}" if logrank else hr_text
    # Head-room above 1.0 keeps the legend off the curves.
    ax.legend(loc="upper right", fontsize=8, title=summary, title_fontsize=8, frameon=True)
    ax.set_ylim(-0.02, 1.42)
    ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.set_xlim(0, ticks[-1])
    ax.set_xticks(ticks)
    ax.set_ylabel(f"{endpoint} probability")
    ax.grid(alpha=0.25)
    table_ax.set_xlim(ax.get_xlim())
    table_ax.set_ylim(-0.5, 1.5)
    table_ax.axis("off")
    if at_risk:
        table_ax.text(0, 1.75, "Number at risk", fontsize=8, ha="left", va="bottom")
        for row, label in ((1, "low"), (0, "high")):
            table_ax.text(
                -0.035,
                row,
                GROUP_LABELS[label].split()[0],
                ha="right",
                va="center",
                fontsize=8,
                color=GROUP_COLOURS[label],
                transform=table_ax.get_yaxis_transform(),
            )
            for tick, count in zip(at_risk["ticks"], at_risk[label]):
                table_ax.text(tick, row, str(count), ha="center", va="center", fontsize=8, color=GROUP_COLOURS[label])
    ax.set_xlabel("Months")


def _km_figure(split: str, entry: Mapping[str, Any], path: Path) -> Path:
    evaluation = entry["evaluation"]
    figure = _figure(12, 5.4)
    grid = figure.add_gridspec(
        2, 2, height_ratios=[5, 0.9], hspace=0.35, wspace=0.22, left=0.07, right=0.98, top=0.88, bottom=0.04
    )
    max_time = max(entry["at_risk"]["integrated"]["ticks"][-1], 1.0) if entry.get("at_risk") else 12.0
    ticks = entry["at_risk"]["integrated"]["ticks"] if entry.get("at_risk") else time_ticks(max_time)
    for column, model in enumerate(MODELS):
        ax = figure.add_subplot(grid[0, column])
        table_ax = figure.add_subplot(grid[1, column])
        _km_panel(
            ax,
            table_ax,
            evaluation[model]["risk_groups"],
            (entry.get("at_risk") or {}).get(model),
            MODEL_LABELS[model],
            "PFS",
            ticks,
        )
    figure.suptitle(
        f"{_pretty_split(split)}: PFS by risk group (n={entry['n_used']}, events={entry['events']})", fontsize=12
    )
    return _save(figure, path)


def _km_os_figure(split: str, entry: Mapping[str, Any], path: Path) -> Path:
    os_block = entry["overall_survival"]
    figure = _figure(6.4, 5.4)
    grid = figure.add_gridspec(2, 1, height_ratios=[5, 0.9], hspace=0.35, left=0.12, right=0.97, top=0.88, bottom=0.04)
    ax = figure.add_subplot(grid[0])
    table_ax = figure.add_subplot(grid[1])
    _km_panel(
        ax,
        table_ax,
        os_block["risk_groups"],
        os_block.get("at_risk"),
        MODEL_LABELS["integrated"],
        "OS",
        os_block["at_risk"]["ticks"],
    )
    figure.suptitle(
        f"{_pretty_split(split)}: overall survival by integrated risk group "
        f"(n={os_block['n']}, deaths={os_block['events']})",
        fontsize=11,
    )
    return _save(figure, path)


def _discrimination_figure(split: str, entry: Mapping[str, Any], path: Path) -> Path:
    evaluation = entry["evaluation"]
    horizons = evaluation["horizons_months"]
    labels = ["C-index"] + [f"AUC {h:g} m" for h in horizons]
    figure = _figure(7.2, 4.4)
    ax = figure.add_subplot(1, 1, 1)
    width = 0.36
    positions = np.arange(len(labels))
    for offset, model in zip((-width / 2, width / 2), MODELS):
        block = evaluation[model]
        c = block["c_index"]
        values = [c["estimate"]] + [point["auc"] for point in block["time_dependent_auc"]]
        heights = [0.0 if v is None else v for v in values]
        bars = ax.bar(positions + offset, heights, width, color=MODEL_COLOURS[model], label=MODEL_LABELS[model])
        if c["estimate"] is not None and c["ci_low"] is not None:
            ax.errorbar(
                positions[0] + offset,
                c["estimate"],
                yerr=[[c["estimate"] - c["ci_low"]], [c["ci_high"] - c["estimate"]]],
                color="black",
                capsize=4,
                linewidth=1,
            )
        for bar, value in zip(bars, values):
            inside = value is not None and value > 0.12
            ax.text(
                bar.get_x() + bar.get_width() / 2,
                0.03,
                _num(value),
                ha="center",
                va="bottom",
                fontsize=8.5,
                color="white" if inside else "black",
                fontweight="bold",
            )
    ax.axhline(0.5, color="#777777", linestyle="--", linewidth=1)
    ax.set_xticks(positions)
    ax.set_xticklabels(labels)
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("C-index / time-dependent AUC")
    ax.legend(loc="upper left", fontsize=8, ncol=2)
    ax.set_title(f"{_pretty_split(split)}: discrimination (C-index with bootstrap 95% CI)", fontsize=11)
    reasons = sorted(
        {
            point["reason"]
            for model in MODELS
            for point in evaluation[model]["time_dependent_auc"]
            if point["auc"] is None and point["reason"]
        }
    )
    if reasons:
        figure.text(0.01, 0.01, "NA: " + "; ".join(reasons), fontsize=7, color="#555555", wrap=True)
        figure.subplots_adjust(bottom=0.2)
    return _save(figure, path)


def _calibration_figure(split: str, entry: Mapping[str, Any], path: Path) -> Path:
    evaluation = entry["evaluation"]
    horizons = evaluation["horizons_months"]
    figure = _figure(5.2 * len(horizons), 5.3)
    legend = None
    for k, months in enumerate(horizons):
        ax = figure.add_subplot(1, len(horizons), k + 1)
        ax.set_title(f"{months:g} months", fontsize=11)
        drawn, reasons = False, []
        for model in MODELS:
            block = evaluation[model]["calibration"][k]
            if not block.get("groups"):
                reasons.append((model, block.get("reason") or "not available"))
                continue
            predicted = [g["predicted"] for g in block["groups"]]
            observed = [g["observed"] for g in block["groups"]]
            low = [
                g["observed"] - (g["observed_ci_low"] if g["observed_ci_low"] is not None else g["observed"])
                for g in block["groups"]
            ]
            high = [
                (g["observed_ci_high"] if g["observed_ci_high"] is not None else g["observed"]) - g["observed"]
                for g in block["groups"]
            ]
            ax.errorbar(
                predicted,
                observed,
                yerr=[low, high],
                color=MODEL_COLOURS[model],
                marker="o",
                linewidth=1.4,
                capsize=3,
                label=f"{MODEL_LABELS[model]} ({len(predicted)} groups)",
            )
            drawn = True
        if not drawn:
            _note(ax, _reasons_text(reasons))
            continue
        ax.plot([0, 1], [0, 1], color="#777777", linestyle="--", linewidth=1, label="Ideal")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_aspect("equal")
        ax.set_xlabel(f"Predicted PFS at {months:g} months")
        ax.set_ylabel(f"Observed PFS at {months:g} months (Kaplan-Meier)")
        ax.grid(alpha=0.25)
        if legend is None:
            legend = ax.get_legend_handles_labels()
        if reasons:
            ax.text(
                0.98,
                0.03,
                _reasons_text(reasons),
                ha="right",
                va="bottom",
                fontsize=7,
                color="#555555",
                transform=ax.transAxes,
            )
    if legend is not None:
        figure.legend(*legend, loc="lower center", ncol=3, fontsize=8, frameon=False)
    figure.suptitle(f"{_pretty_split(split)}: calibration (groups of equal size by predicted PFS; 95% CI)", fontsize=11)
    figure.subplots_adjust(left=0.08, right=0.98, top=0.86, bottom=0.17, wspace=0.25)
    return _save(figure, path)


def _decision_figure(split: str, entry: Mapping[str, Any], path: Path) -> Path:
    evaluation = entry["evaluation"]
    horizons = evaluation["horizons_months"]
    figure = _figure(5.6 * len(horizons), 4.6)
    for k, months in enumerate(horizons):
        ax = figure.add_subplot(1, len(horizons), k + 1)
        ax.set_title(f"{months:g} months", fontsize=11)
        reference = None
        top, reasons = 0.05, []
        for model in MODELS:
            block = evaluation[model]["decision_curve"][k]
            if block.get("thresholds") is None:
                reasons.append((model, block.get("reason") or "not available"))
                continue
            reference = block
            ax.plot(
                block["thresholds"],
                block["net_benefit_model"],
                color=MODEL_COLOURS[model],
                linewidth=1.8,
                label=MODEL_LABELS[model],
            )
            top = max(top, max(block["net_benefit_model"]))
        if reference is not None:
            ax.plot(
                reference["thresholds"],
                reference["net_benefit_treat_all"],
                color="#888888",
                linewidth=1.2,
                label="Treat all",
            )
            ax.plot(
                reference["thresholds"],
                reference["net_benefit_treat_none"],
                color="black",
                linewidth=1.2,
                label="Treat none",
            )
            top = max(top, reference["prevalence"])
            ax.legend(loc="upper right", fontsize=8)
        else:
            _note(ax, _reasons_text(reasons))
            continue
        ax.set_xlim(0, 1)
        ax.set_ylim(-0.05, top * 1.1 + 0.02)
        ax.set_xlabel(f"Threshold probability of progression by {months:g} months")
        ax.set_ylabel("Net benefit")
        ax.grid(alpha=0.25)
    figure.suptitle(f"{_pretty_split(split)}: decision curves", fontsize=11)
    figure.subplots_adjust(left=0.08, right=0.98, top=0.86, bottom=0.13, wspace=0.22)
    return _save(figure, path)


def _c_index_figure(splits: Mapping[str, Mapping[str, Any]], path: Path) -> Path:
    evaluated = [(name, entry) for name, entry in splits.items() if entry.get("evaluation")]
    figure = _figure(7.5, 1.2 + 0.75 * max(1, len(evaluated)))
    ax = figure.add_subplot(1, 1, 1)
    labels = []
    for row, (name, entry) in enumerate(evaluated):
        labels.append(f"{_pretty_split(name)} (n={entry['n_used']})")
        for offset, model in zip((0.15, -0.15), MODELS):
            c = entry["evaluation"][model]["c_index"]
            if c["estimate"] is None:
                continue
            y = -row + offset
            if c["ci_low"] is not None:
                ax.plot([c["ci_low"], c["ci_high"]], [y, y], color=MODEL_COLOURS[model], linewidth=1.6)
            ax.plot(
                [c["estimate"]],
                [y],
                marker="o",
                color=MODEL_COLOURS[model],
                label=MODEL_LABELS[model] if row == 0 else None,
            )
            ax.text(
                1.005,
                y,
                _ci(c["estimate"], c["ci_low"], c["ci_high"]),
                va="center",
                fontsize=8,
                transform=ax.get_yaxis_transform(),
            )
    lows = [entry["evaluation"][model]["c_index"]["ci_low"] for _, entry in evaluated for model in MODELS]
    lows += [entry["evaluation"][model]["c_index"]["estimate"] for _, entry in evaluated for model in MODELS]
    lowest = min([value for value in lows if value is not None] + [0.4])
    ax.axvline(0.5, color="#777777", linestyle="--", linewidth=1)
    ax.set_yticks([-row for row in range(len(evaluated))])
    ax.set_yticklabels(labels)
    ax.set_ylim(-len(evaluated) + 0.5, 0.6)
    ax.set_xlim(math.floor(lowest * 10) / 10 - 0.02, 1.0)
    ax.set_xlabel("Harrell's C-index (bootstrap 95% CI)")
    ax.grid(axis="x", alpha=0.25)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), fontsize=8, ncol=2, frameon=False)
    ax.set_title("C-index by split", fontsize=11, pad=22)
    height = figure.get_figheight()
    figure.subplots_adjust(left=0.26, right=0.74, top=1 - 0.8 / height, bottom=0.65 / height)
    return _save(figure, path)


def _lasso_cv_figure(lasso: Mapping[str, Any], path: Path) -> Path:
    curve = lasso["curve"]
    log_alpha = np.log([point["alpha"] for point in curve])
    mean = np.array([np.nan if p["mean_c_index"] is None else p["mean_c_index"] for p in curve])
    se = np.array([0.0 if p["se_c_index"] is None else p["se_c_index"] for p in curve])
    figure = _figure(7.5, 4.8)
    ax = figure.add_subplot(1, 1, 1)
    ax.errorbar(
        log_alpha,
        mean,
        yerr=se,
        fmt="o",
        markersize=3.5,
        color="#b2182b",
        ecolor="#bbbbbb",
        elinewidth=1,
        capsize=1.5,
        label="mean CV C-index ± SE",
    )
    cv = lasso["cv"]
    chosen = math.log(lasso["alpha"])
    ax.axvline(
        math.log(cv["alpha_best"]),
        color="#333333",
        linestyle="--",
        linewidth=1,
        label=f"best (min rule): alpha {cv['alpha_best']:.3g}",
    )
    ax.axvline(
        math.log(cv["alpha_1se"]),
        color="#333333",
        linestyle=":",
        linewidth=1.2,
        label=f"1-SE rule: alpha {cv['alpha_1se']:.3g}",
    )
    ax.plot(
        [chosen],
        [cv["chosen_mean_c_index"]],
        marker="*",
        markersize=15,
        color="#2166ac",
        linestyle="none",
        label=f"chosen ({lasso['selection']}): {len(lasso['selected_features'])} features",
    )
    ax.set_xlabel("log(alpha)")
    ax.set_ylabel(f"Harrell's C, held-out fold ({cv['folds']}-fold CV)")
    ax.grid(alpha=0.25)
    ax.legend(loc="lower left", fontsize=8)
    top = ax.secondary_xaxis("top")
    picks = np.unique(np.linspace(0, len(curve) - 1, min(10, len(curve))).round().astype(int))
    top.set_xticks(log_alpha[picks])
    top.set_xticklabels([str(curve[i]["n_nonzero"]) for i in picks], fontsize=8)
    top.set_xlabel("non-zero coefficients", fontsize=9)
    ax.set_title("LASSO-Cox: cross-validated C-index along the alpha path", fontsize=11, pad=34)
    figure.subplots_adjust(left=0.1, right=0.97, top=0.8, bottom=0.11)
    return _save(figure, path)


def _lasso_path_figure(path_data: Mapping[str, Any], selected: Sequence[str], path: Path) -> Path:
    return _save(lasso_path_figure(path_data, selected), path)


def lasso_path_figure(path_data: Mapping[str, Any], selected: Sequence[str]) -> Any:
    """The LASSO-Cox coefficient path as fitted (``training.lasso.coefficient_path``), a matplotlib Figure."""
    log_alpha = np.log(path_data["alphas"])
    chosen = math.log(path_data["chosen_alpha"])
    # Past the chosen alpha the path soon over-fits and its large coefficients would dwarf the
    # region that matters; the window ends 2.5 log-units (alpha / 12) below the chosen alpha.
    window = log_alpha >= max(float(log_alpha.min()), chosen - 2.5)
    figure = _figure(8.5, 5.0)
    ax = figure.add_subplot(1, 1, 1)
    extreme = max(
        [abs(v) for values in path_data["features"].values() for v, keep in zip(values, window) if keep] + [1e-6]
    )
    colours = [
        "#1b9e77",
        "#d95f02",
        "#7570b3",
        "#e7298a",
        "#66a61e",
        "#e6ab02",
        "#a6761d",
        "#1f78b4",
        "#b2df8a",
        "#fb9a99",
        "#cab2d6",
        "#6a3d9a",
    ]
    shown = 0
    for name, values in path_data["features"].items():
        if name in selected:
            colour = colours[shown % len(colours)]
            ax.plot(log_alpha, values, color=colour, linewidth=1.6, label=name if shown < len(colours) else None)
            shown += 1
        else:
            ax.plot(log_alpha, values, color="#cccccc", linewidth=0.8)
    ax.axvline(chosen, color="#333333", linestyle="--", linewidth=1, label="chosen alpha")
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xlim(float(log_alpha[window].min()) - 0.05, float(log_alpha.max()) + 0.05)
    ax.set_ylim(-extreme * 1.15, extreme * 1.15)
    ax.set_xlabel("log(alpha)")
    ax.set_ylabel("coefficient (z-scored feature)")
    ax.grid(alpha=0.25)
    ax.set_title("LASSO-Cox coefficient path (selected features in colour)", fontsize=11, loc="left")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7, frameon=False)
    figure.subplots_adjust(left=0.09, right=0.6, top=0.92, bottom=0.11)
    return figure


def _forest_figure(rows: Sequence[Mapping[str, Any]], title: str, path: Path) -> Path:
    figure = _figure(8.8, 1.3 + 0.42 * max(1, len(rows)))
    ax = figure.add_subplot(1, 1, 1)
    estimable = [row for row in rows if row.get("hr") is not None]
    if not rows:
        _note(ax, "no terms")
    for position, row in enumerate(rows):
        y = -position
        if row.get("hr") is None:
            ax.text(1.02, y, "not estimable", va="center", fontsize=8, transform=ax.get_yaxis_transform())
            continue
        colour = "#b2182b" if row.get("p") is not None and row["p"] < 0.05 else "#2166ac"
        ax.plot([row["ci_low"], row["ci_high"]], [y, y], color=colour, linewidth=1.6)
        ax.plot([row["hr"]], [y], marker="s", color=colour, markersize=6)
        text = f"{_num(row['hr'], 2)} ({_num(row['ci_low'], 2)}–{_num(row['ci_high'], 2)})   {_p(row.get('p'))}"
        ax.text(1.02, y, text, va="center", fontsize=8, transform=ax.get_yaxis_transform())
    ax.set_yticks([-k for k in range(len(rows))])
    ax.set_yticklabels([row.get("name", "?") for row in rows], fontsize=9)
    ax.set_ylim(-len(rows) + 0.4, 0.6)
    if estimable:
        ax.set_xscale("log")
        low = min(row["ci_low"] for row in estimable)
        high = max(row["ci_high"] for row in estimable)
        low, high = min(low, 0.8), max(high, 1.25)
        ax.set_xlim(low / 1.15, high * 1.15)
        from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator

        nice = [v * 10.0**k for k in range(-4, 5) for v in (1, 2, 5)]
        ticks = [v for v in nice if low / 1.15 <= v <= high * 1.15]
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xticklabels([f"{v:g}" for v in ticks])
    ax.axvline(1.0, color="#777777", linestyle="--", linewidth=1)
    ax.set_xlabel("Hazard ratio (95% CI), log scale")
    ax.text(1.02, 1.0, "HR (95% CI)   p", transform=ax.transAxes, fontsize=8, fontweight="bold", va="bottom")
    ax.grid(axis="x", alpha=0.25)
    ax.set_title(title, fontsize=11, loc="left")
    figure.subplots_adjust(
        left=0.24, right=0.66, top=1 - 0.55 / figure.get_figheight(), bottom=0.6 / figure.get_figheight()
    )
    return _save(figure, path)


def _stability_figure(stability: Mapping[str, Any], path: Path) -> Path:
    values = np.array([row["icc"] for row in stability["features"] if row["icc"] is not None], dtype=float)
    missing = sum(1 for row in stability["features"] if row["icc"] is None)
    figure = _figure(7.2, 4.2)
    ax = figure.add_subplot(1, 1, 1)
    bins = np.linspace(min(-0.2, float(values.min()) if values.size else 0.0), 1.0, 41)
    ax.hist(np.clip(values, bins[0], 1.0), bins=bins, color="#4393c3", edgecolor="white")
    ax.axvline(
        stability["icc_threshold"],
        color="#c51b7d",
        linestyle="--",
        linewidth=1.5,
        label=f"threshold {stability['icc_threshold']:g}",
    )
    ax.set_xlabel(f"{stability['icc']} over the original and {len(stability['extractions']) - 1} perturbed extractions")
    ax.set_ylabel("candidate features")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(
        f"Stability screen: {stability['features_kept']} of {stability['features_screened']} features kept "
        f"({stability['patients_screened']} patients)" + (f"; {missing} without an ICC" if missing else ""),
        fontsize=10,
    )
    return _save(figure, path)


PREDICTIVE_COLOURS = {"low": GROUP_COLOURS["low"], "high": GROUP_COLOURS["high"], "control": "#555555"}


def _predictive_figure(predictive: Mapping[str, Any], path: Path) -> Path:
    endpoints = [(name, label) for name, label in (("pfs", "PFS"), ("os", "OS")) if predictive.get(name)]
    figure = _figure(6.4 * len(endpoints), 5.0)
    for column, (name, label) in enumerate(endpoints):
        block = predictive[name]
        ax = figure.add_subplot(1, len(endpoints), column + 1)
        curves = [
            ("low", block["groups"]["low"]["treated"], "Low risk, treated"),
            ("high", block["groups"]["high"]["treated"], "High risk, treated"),
            ("control", block["control"], "Control"),
        ]
        for key, km, text in curves:
            if not km:
                continue
            hr = None if key == "control" else block["groups"][key]["vs_control"]["hazard_ratio_treated_vs_control"]
            legend = f"{text} (n={km['n']}): m{label} {_median(km)}" + (f"; HR vs control {_hr(hr)}" if hr else "")
            _km_step(ax, km["curve"], PREDICTIVE_COLOURS[key], legend)
        interaction = block.get("interaction")
        title = (
            f"risk group x treatment interaction {_p_with_sign(interaction['p'])}"
            if interaction
            else "interaction not estimable"
        )
        ax.legend(loc="upper right", fontsize=7.5, title=title, title_fontsize=8)
        ax.set_ylim(-0.02, 1.42)
        ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
        ax.set_xlabel("Months")
        ax.set_ylabel(f"{label} probability")
        ax.grid(alpha=0.25)
        ax.set_title(f"{label}: treated by integrated risk group vs control", fontsize=10)
    return _save(figure, path)


def _draw_figures(report: Mapping[str, Any], folder: Path) -> list[dict[str, Any]]:
    import matplotlib

    figures: list[dict[str, Any]] = []
    with matplotlib.rc_context(
        {"font.size": 9, "axes.titleweight": "bold", "axes.spines.top": False, "axes.spines.right": False}
    ):
        training = report["training"]
        lasso = training["lasso"]

        def add(kind, split, title, draw, *args):
            name = f"{kind}-{split}.png" if split else f"{kind}.png"
            draw(*args, folder / name)
            figures.append({"kind": kind, "split": split, "title": title, "file": f"{FIGURES_FOLDER}/{name}"})

        stability = training.get("stability") or {}
        if stability.get("ran") and stability.get("features"):
            add("stability-icc", None, "Stability screen: ICC of every candidate feature", _stability_figure, stability)
        add("lasso-cv", None, "LASSO-Cox cross-validation curve", _lasso_cv_figure, lasso)
        # The fit always records its path (scoring.training.method), so the figure is always drawn.
        add(
            "lasso-path",
            None,
            "LASSO-Cox coefficient path",
            _lasso_path_figure,
            lasso["coefficient_path"],
            [f["name"] for f in lasso["selected_features"]],
        )
        clinical = training["clinical"]
        if clinical["univariate"]:
            add(
                "forest-univariate",
                None,
                "Univariate Cox models of the clinical candidates (training)",
                _forest_figure,
                clinical["univariate"],
                "Univariate Cox, PFS (training)",
            )
        if clinical["multivariate"]:
            add(
                "forest-multivariate",
                None,
                "Multivariate Cox model of the clinical variables (training)",
                _forest_figure,
                clinical["multivariate"][-1]["table"],
                "Multivariate Cox, PFS (training)",
            )
        add(
            "forest-integrated",
            None,
            "Integrated Cox model (training)",
            _forest_figure,
            training["integrated_cox"]["table"],
            "Integrated Cox model, PFS (training)",
        )
        if any(entry.get("evaluation") for entry in report["splits"].values()):
            add("c-index", None, "C-index of both models in every split", _c_index_figure, report["splits"])
        for split, entry in report["splits"].items():
            if not entry.get("evaluation"):
                continue
            pretty = _pretty_split(split)
            add("km", split, f"{pretty}: Kaplan-Meier PFS by risk group", _km_figure, split, entry)
            add(
                "discrimination",
                split,
                f"{pretty}: C-index and time-dependent AUC",
                _discrimination_figure,
                split,
                entry,
            )
            add("calibration", split, f"{pretty}: calibration", _calibration_figure, split, entry)
            add("decision-curve", split, f"{pretty}: decision curves", _decision_figure, split, entry)
            if entry.get("overall_survival"):
                add("km-os", split, f"{pretty}: Kaplan-Meier OS by integrated risk group", _km_os_figure, split, entry)
        predictive = report.get("predictive") or {}
        if predictive.get("pfs"):
            add(
                "km-predictive",
                None,
                "Treated risk groups vs control (the paper's Figure 7)",
                _predictive_figure,
                predictive,
            )
    return figures


# --------------------------------------------------------------------------- HTML


_CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:0 auto;max-width:1180px;
padding:0 24px 48px;color:#222;line-height:1.45}
h1{font-size:1.6em;margin-top:24px}h2{border-bottom:2px solid #2166ac;padding-bottom:4px;margin-top:40px}
h3{margin-top:28px}
table{border-collapse:collapse;margin:10px 0 18px;font-size:.9em}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#eef3f8}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.banner{background:#fde0dd;border:2px solid #c51b7d;padding:10px 14px;font-weight:bold;margin:12px 0}
.note{color:#555;font-size:.9em}.bad{color:#b2182b}
figure{margin:14px 0 26px}figure img{max-width:100%;border:1px solid #ddd}
figcaption{font-size:.9em;color:#444}
code{background:#f4f4f4;padding:1px 4px;border-radius:3px;font-size:.92em}
nav ul{columns:2}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _table(header: Sequence[str] | None, rows: Sequence[Sequence[Any]], numeric: Sequence[int] = ()) -> str:
    parts = ["<table>"]
    if header:
        parts += ["<thead><tr>", *(f"<th>{_e(h)}</th>" for h in header), "</tr></thead>"]
    parts.append("<tbody>")
    for row in rows:
        parts.append("<tr>")
        for k, cell in enumerate(row):
            css = ' class="num"' if k in numeric else ""
            parts.append(f"<td{css}>{_e(cell)}</td>")
        parts.append("</tr>")
    parts.append("</tbody></table>")
    return "".join(parts)


def _image(folder: Path, figure: Mapping[str, Any]) -> str:
    data = base64.b64encode((folder / figure["file"]).read_bytes()).decode("ascii")
    return (
        f'<figure><img alt="{_e(figure["title"])}" src="data:image/png;base64,{data}">'
        f"<figcaption>{_e(figure['title'])} (<code>{_e(figure['file'])}</code>)</figcaption></figure>"
    )


def _figures_of(report, folder: Path, kind: str, split: str | None = None) -> str:
    return "".join(_image(folder, f) for f in report["figures"] if f["kind"] == kind and f["split"] == split)


def _auc(block: Mapping[str, Any], months: float) -> str:
    for point in block["time_dependent_auc"]:
        if point["months"] == months:
            return _num(point["auc"])
    return "NA"


def _performance_table(report) -> str:
    horizons = report["spec"]["evaluation"]["horizons_months"]
    header = ["Split", "n", "events"]
    for model in MODELS:
        header += [f"{MODEL_LABELS[model]}: C-index (95% CI)"] + [f"AUC {h:g} m" for h in horizons]
    header.append("C-index difference, integrated − radiomics (95% CI)")
    rows = []
    for split, entry in report["splits"].items():
        evaluation = entry.get("evaluation")
        if not evaluation:
            rows.append(
                [_pretty_split(split), entry["n_used"], entry["events"] if entry["events"] is not None else "NA"]
                + ["not evaluated"] * (2 * (1 + len(horizons)) + 1)
            )
            continue
        row = [_pretty_split(split), evaluation["n"], evaluation["events"]]
        for model in MODELS:
            c = evaluation[model]["c_index"]
            row.append(_ci(c["estimate"], c["ci_low"], c["ci_high"]))
            row += [_auc(evaluation[model], h) for h in horizons]
        d = evaluation["comparison"]["c_index_integrated_minus_radiomics"]
        row.append(_ci(d["estimate"], d["ci_low"], d["ci_high"]))
        rows.append(row)
    return _table(header, rows, numeric=tuple(range(1, len(header))))


def _risk_group_rows(report, endpoint: str) -> list[list[Any]]:
    rows = []
    for split, entry in report["splits"].items():
        if not entry.get("evaluation"):
            continue
        blocks = (
            [("integrated", entry["overall_survival"]["risk_groups"])]
            if endpoint == "OS"
            else [(model, entry["evaluation"][model]["risk_groups"]) for model in MODELS]
        )
        if endpoint == "OS" and not entry.get("overall_survival"):
            continue
        for model, block in blocks:
            groups = block["groups"]
            logrank = block.get("logrank")
            rows.append(
                [
                    _pretty_split(split),
                    MODEL_LABELS[model],
                    f"{groups['low']['n']} / {groups['low']['events']}",
                    _median(groups["low"]),
                    f"{groups['high']['n']} / {groups['high']['events']}",
                    _median(groups["high"]),
                    _hr(block.get("hazard_ratio_low_vs_high")),
                    _p(logrank["p"] if logrank else None),
                    block.get("reason") or "",
                ]
            )
    return rows


def _auc_reasons(report) -> list[list[Any]]:
    rows = []
    for split, entry in report["splits"].items():
        evaluation = entry.get("evaluation")
        if not evaluation:
            continue
        for model in MODELS:
            for what, items, value_key in (
                ("AUC", evaluation[model]["time_dependent_auc"], "auc"),
                ("calibration", evaluation[model]["calibration"], "groups"),
                ("decision curve", evaluation[model]["decision_curve"], "thresholds"),
            ):
                for item in items:
                    if item.get(value_key) is None and item.get("reason"):
                        rows.append(
                            [_pretty_split(split), MODEL_LABELS[model], f"{what} {item['months']:g} m", item["reason"]]
                        )
    return rows


def _cox_rows(table: Sequence[Mapping[str, Any]], with_kept: bool = False) -> list[list[Any]]:
    rows = []
    for row in table:
        cells = [
            row.get("name"),
            _num(row.get("coef"), 4),
            _hr(row if row.get("hr") is not None else None),
            _p(row.get("p")),
        ]
        if with_kept:
            cells.append("yes" if row.get("kept") else "no")
            cells.append(row.get("note", ""))
        rows.append(cells)
    return rows


def _render_html(report: Mapping[str, Any], folder: Path) -> str:
    model = report["model"]
    training = report["training"]
    lasso = training["lasso"]
    clinical = training["clinical"]
    extraction = report["extraction"]
    out: list[str] = []
    add = out.append
    add('<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">')
    add(f"<title>Training report: {_e(model['name'])} {_e(model['version'])}</title>")
    add(f"<style>{_CSS}</style></head><body>")
    add(f"<h1>Training report: {_e(model['name'])} {_e(model['version'])}</h1>")
    if model["demonstration"]:
        add('<div class="banner">DEMONSTRATION MODEL — NOT FOR CLINICAL USE (demonstration: true)</div>')
    add(
        _table(
            None,
            [
                ["Model file", model["file"]],
                ["sha256", model["sha256"]],
                ["Created", model["created"]],
                ["Intended use", model["intended_use"]],
                ["demonstration", str(model["demonstration"]).lower()],
                ["Cohort CSV", f"{report['inputs']['cohort']} (sha256 {report['inputs']['cohort_sha256'][:16]}…)"],
                ["Training spec", f"{report['inputs']['spec']} (sha256 {report['inputs']['spec_sha256'][:16]}…)"],
                ["Report written", report["created"]],
            ],
        )
    )
    add(
        '<p class="note">Method: Zhao et al., J Immunother Cancer 2023;11:e007492 (integrated clinical + '
        "peritumoral radiomics Cox model), as implemented in <code>scoring.training.method</code>. "
        "Patients are named by their line in the cohort CSV, never by id. Medians in months; NR = not "
        "reached; NA = not available (reason given below).</p>"
    )
    sections = [
        ("cohort", "Cohort"),
        ("performance", "Performance (Table 3)"),
        ("km", "Risk groups"),
        ("features", "Radiomics signature"),
        ("clinical", "Clinical variables"),
        ("integrated", "Integrated model"),
        ("robust", "Robust features"),
        ("internal", "Internal validation"),
        ("predictive", "Treatment comparison (Figure 7)"),
        ("splits", "Figures per split"),
        ("extraction", "Feature extraction"),
        ("notes", "Notes, warnings and timings"),
    ]
    add("<nav><ul>" + "".join(f'<li><a href="#{key}">{_e(title)}</a></li>' for key, title in sections) + "</ul></nav>")

    # Cohort
    add('<h2 id="cohort">Cohort</h2>')
    rows = []
    for split, entry in report["splits"].items():
        rows.append(
            [
                _pretty_split(split),
                split,
                entry["n"],
                entry["n_used"],
                entry["events"] if entry["events"] is not None else "NA",
                len(entry["excluded"]),
                entry["error"] or "",
            ]
        )
    add(
        _table(
            ["Split", "name in CSV", "patients", "evaluated", "PFS events", "excluded", "not evaluated because"],
            rows,
            numeric=(2, 3, 4, 5),
        )
    )
    pfs = training["median_pfs_months"]
    add(
        f"<p>Training: n = {training['n']}, events = {training['events']}, median PFS "
        f"{_median({'n': 1, 'median': pfs['median'], 'ci_low': pfs['ci_low'], 'ci_high': pfs['ci_high']})} months, "
        f"median follow-up {_num(training['median_follow_up_months'], 1)} months (reverse Kaplan-Meier).</p>"
    )

    # Performance
    add('<h2 id="performance">Performance of the radiomics and the integrated model (as the paper\'s Table 3)</h2>')
    add(_performance_table(report))
    add(
        '<p class="note">Harrell\'s C with a percentile bootstrap 95% CI '
        f"({report['spec']['evaluation']['bootstrap']} resamples, seed {report['spec']['evaluation']['seed']}); "
        "cumulative/dynamic time-dependent AUC with inverse-probability-of-censoring weights from the training "
        "split. A CI is NA when too few bootstrap resamples could be scored (small split).</p>"
    )
    add(_figures_of(report, folder, "c-index"))

    # Risk groups
    add('<h2 id="km">Risk groups: Kaplan-Meier PFS</h2>')
    header = [
        "Split",
        "Model",
        "Low: n / events",
        "Low: median PFS (95% CI)",
        "High: n / events",
        "High: median PFS (95% CI)",
        "HR low vs high (95% CI)",
        "log-rank p",
        "note",
    ]
    add(_table(header, _risk_group_rows(report, "PFS"), numeric=(2, 3, 4, 5, 6, 7)))
    add(
        f'<p class="note">High risk = score above the training median (radiomics cut-off '
        f"{_num(training['radiomics_cutoff'], 4)}, risk cut-off {_num(training['risk_cutoff'], 4)}). "
        "HR from a Cox model of the group indicator (Wald p), quoted low vs high as in the paper.</p>"
    )
    os_rows = _risk_group_rows(report, "OS")
    if os_rows:
        add("<h3>Overall survival by integrated risk group</h3>")
        add(
            _table(
                [
                    "Split",
                    "Model",
                    "Low: n / deaths",
                    "Low: median OS (95% CI)",
                    "High: n / deaths",
                    "High: median OS (95% CI)",
                    "HR low vs high (95% CI)",
                    "log-rank p",
                    "note",
                ],
                os_rows,
                numeric=(2, 3, 4, 5, 6, 7),
            )
        )

    # Radiomics signature
    add('<h2 id="features">Radiomics signature (LASSO-Cox)</h2>')
    cv = lasso["cv"]
    add(
        f"<p>{training['candidate_features']} candidate features; dropped before LASSO: "
        f"{len(training['dropped_features']['non_finite'])} with a non-finite value in training, "
        f"{len(training['dropped_features']['zero_variance'])} constant, "
        f"{len(training['dropped_features'].get('unstable', []))} unstable under perturbation "
        f'(<a href="#robust">stability screen</a>). {cv["folds"]}-fold cross-validation '
        f"({_e(cv['scheme'])}, seed {cv['seed']}), {cv['n_alphas']} alphas from {cv['alpha_max']:.4g} to "
        f"{cv['alpha_min_path']:.4g}; best alpha {cv['alpha_best']:.4g} (mean C {_num(cv['best_mean_c_index'])} "
        f"± {_num(cv['best_se_c_index'])}), 1-SE alpha {cv['alpha_1se']:.4g}; rule <code>{_e(lasso['selection'])}"
        f"</code> chose alpha {lasso['alpha']:.4g}, keeping {len(lasso['selected_features'])} features.</p>"
    )
    add(
        _table(
            ["Feature", "coefficient (per SD)", "training mean", "training SD"],
            [
                [f["name"], _num(f["coefficient"], 4), f"{f['mean']:.6g}", f"{f['sd']:.6g}"]
                for f in training["selected_features"]
            ],
            numeric=(1, 2, 3),
        )
    )
    add(
        f"<p>Radiomics score = Σ coefficient × (x − mean) / SD; cut-off (training median) "
        f"{_num(training['radiomics_cutoff'], 4)}.</p>"
    )
    add(_figures_of(report, folder, "lasso-cv"))
    add(_figures_of(report, folder, "lasso-path"))

    # Clinical
    add('<h2 id="clinical">Clinical variables</h2>')
    add(
        f"<p>Univariate Cox (Efron ties, Wald p) of each candidate; p &lt; {clinical['univariate_p']:g} enters the "
        f"multivariate model; p &lt; {clinical['multivariate_p']:g} there enters the integrated model "
        f"(<code>{_e(clinical['multivariate_elimination'])}</code>). Selected: "
        f"{_e(', '.join(clinical['selected']) or 'none')}.</p>"
    )
    add("<h3>Univariate</h3>")
    add(
        _table(
            ["Variable", "coef", "HR (95% CI)", "p", "to multivariate", "note"],
            _cox_rows(clinical["univariate"], with_kept=True),
            numeric=(1, 2, 3),
        )
    )
    add(_figures_of(report, folder, "forest-univariate"))
    for step, item in enumerate(clinical["multivariate"], start=1):
        add(f"<h3>Multivariate{f' (step {step})' if len(clinical['multivariate']) > 1 else ''}</h3>")
        add(_table(["Variable", "coef", "HR (95% CI)", "p"], _cox_rows(item["table"]), numeric=(1, 2, 3)))
    if not clinical["multivariate"]:
        add("<p>No candidate passed the univariate screen, so there is no multivariate model.</p>")
    add(_figures_of(report, folder, "forest-multivariate"))
    add("<h3>Spearman correlation of the radiomics score with the clinical candidates (training)</h3>")
    add(
        _table(
            ["Variable", "rho", "p", "note"],
            [
                [r["name"], _num(r.get("rho")), _p(r.get("p")), r.get("note", "")]
                for r in training["spearman_radiomics_score"]
            ],
            numeric=(1, 2),
        )
    )
    add("<h3>Variance inflation factors of the integrated model's terms</h3>")
    add(_table(["Term", "VIF"], [[name, _num(value)] for name, value in training["vif"].items()], numeric=(1,)))

    # Integrated
    add('<h2 id="integrated">Integrated model</h2>')
    add(_table(["Term", "coef", "HR (95% CI)", "p"], _cox_rows(training["integrated_cox"]["table"]), numeric=(1, 2, 3)))
    radiomics_only = "; ".join(f"{r['name']} HR {_hr(r)}, p {_p(r['p'])}" for r in training["radiomics_only_cox"])
    add(
        f"<p>Risk score = linear predictor; cut-off (training median) {_num(training['risk_cutoff'], 4)}; "
        f"Breslow baseline PFS. Radiomics-only Cox (used for its calibration and decision curves): "
        f"{_e(radiomics_only)}.</p>"
    )
    add(_figures_of(report, folder, "forest-integrated"))

    _robust_section(add, report, folder)
    _internal_section(add, report)
    _predictive_section(add, report, folder)

    # Per split figures
    add('<h2 id="splits">Figures per split</h2>')
    for split, entry in report["splits"].items():
        add(f'<h3 id="split-{_e(split)}">{_e(_pretty_split(split))} (<code>{_e(split)}</code>)</h3>')
        if not entry.get("evaluation"):
            add(f'<p class="bad">Not evaluated: {_e(entry["error"] or "no patient")}</p>')
            continue
        for kind in ("km", "discrimination", "calibration", "decision-curve", "km-os"):
            add(_figures_of(report, folder, kind, split))
    reasons = _auc_reasons(report)
    if reasons:
        add("<h3>Values not available</h3>")
        add(_table(["Split", "Model", "What", "Reason"], reasons))

    # Extraction
    add('<h2 id="extraction">Feature extraction</h2>')
    counts = extraction["counts"]
    add(
        _table(
            ["computed now", "from the cache", "precomputed in the CSV", "failed", "seconds", "workers", "scheduler"],
            [
                [
                    counts["computed"],
                    counts["cached"],
                    counts["precomputed"],
                    counts["failed"],
                    _num(extraction["seconds"], 1),
                    extraction["workers"] or "CPU count",
                    extraction["scheduler"] or "local processes",
                ]
            ],
            numeric=(0, 1, 2, 3, 4),
        )
    )
    add(f"<p>Cache: <code>{_e(extraction['cache_dir'])}</code>; {extraction['feature_columns']} feature columns.</p>")
    if extraction["failures"]:
        add("<h3>Failures (left out; the run went on)</h3>")
        add(
            _table(
                ["CSV line", "split", "reason"],
                [[f["row"], f["split"], f["reason"]] for f in extraction["failures"]],
                numeric=(0,),
            )
        )
    else:
        add("<p>No extraction failure.</p>")
    dropped = training["dropped_features"]
    if dropped["non_finite"] or dropped["zero_variance"] or dropped.get("unstable"):
        add("<h3>Candidate features dropped before LASSO</h3>")
        add(
            _table(
                ["reason", "features"],
                [
                    ["non-finite in training", ", ".join(dropped["non_finite"]) or "none"],
                    ["zero variance", ", ".join(dropped["zero_variance"]) or "none"],
                    [
                        "unstable (ICC below the threshold)",
                        f"{len(dropped.get('unstable', []))} features (listed in report.json)",
                    ],
                ],
            )
        )
    excluded = [
        [_pretty_split(split), item["row"], item["reason"]]
        for split, entry in report["splits"].items()
        for item in entry["excluded"]
    ]
    if excluded:
        add("<h3>Patients left out of the evaluation</h3>")
        add(_table(["Split", "CSV line", "reason"], excluded, numeric=(1,)))

    # Notes
    add('<h2 id="notes">Notes, warnings and timings</h2>')
    if report["warnings"]:
        add("<ul>" + "".join(f"<li>{_e(w)}</li>" for w in report["warnings"]) + "</ul>")
    else:
        add("<p>No warning.</p>")
    add(_table(["step", "seconds"], [[k, _num(v, 1)] for k, v in report["timings_seconds"].items()], numeric=(1,)))
    add(_table(["software", "version"], [[k, v] for k, v in report["software"].items()]))
    add("</body></html>\n")
    return "".join(out)


def _robust_section(add, report: Mapping[str, Any], folder: Path) -> None:
    training = report["training"]
    stability = training.get("stability") or {}
    log = training.get("log_transform") or {}
    add('<h2 id="robust">Robust features: log transform and stability screen</h2>')
    if log:
        rule = log.get("rule") or ("none" if log["setting"] == "none" else "the features listed in the spec")
        selected = log.get("transformed_selected") or []
        add(
            f"<p>Log transform (<code>preprocessing.log_transform = {_e(json.dumps(log['setting']))}</code>): "
            f"{_e(rule)}. {log['transformed_candidates']} candidate features were transformed with signed_log1p "
            "(sign(x)·log1p(|x|)) before z-scoring; selected among them: "
            f"{_e(', '.join(selected) or 'none')}.</p>"
        )
    if not stability:
        return
    if not stability.get("ran"):
        add(f"<p>Stability screen not run: {_e(stability.get('note') or 'switched off')}.</p>")
        return
    extraction = report["extraction"].get("stability") or {}
    add(
        f"<p>Stability screen (Zwanenburg et al., Sci Rep 2019): {stability['patients_screened']} training patients "
        f"re-extracted under {_e(', '.join(stability['perturbations']))} (noise SD {stability['noise_sd_hu']:g} HU, "
        f"shift {stability['shift_voxels']:g} voxel, dilation/erosion by one voxel, ball); "
        f"{_e(stability['icc_formula'])}. Kept {stability['features_kept']} of {stability['features_screened']} "
        f"candidate features with {_e(stability['icc'])} &ge; {stability['icc_threshold']:g}"
        + (f"; perturbed extractions took {_num(extraction.get('seconds'), 1)} s" if extraction else "")
        + ".</p>"
    )
    add(_figures_of(report, folder, "stability-icc"))
    selected = {f["name"] for f in training["selected_features"]}
    rows = sorted(stability["features"], key=lambda row: (row["icc"] is None, -(row["icc"] or 0.0)))
    shown = [row for row in rows if row["name"] in selected] + [row for row in rows if not row["kept"]][:40]
    add("<h3>ICC of the selected features and of the least stable candidates</h3>")
    add(
        _table(
            ["Feature", "ICC", "patients", "kept", "selected"],
            [
                [
                    row["name"],
                    _num(row["icc"]),
                    row["patients"],
                    "yes" if row["kept"] else "no",
                    "yes" if row["name"] in selected else "",
                ]
                for row in shown
            ],
            numeric=(1, 2),
        )
    )
    add('<p class="note">Every candidate\'s ICC is in report.json (<code>training.stability.features</code>).</p>')
    if extraction.get("failures"):
        add(
            _table(
                ["perturbation", "CSV line", "reason"],
                [[f["perturbation"], f["row"], f["reason"]] for f in extraction["failures"]],
                numeric=(1,),
            )
        )


def _internal_section(add, report: Mapping[str, Any]) -> None:
    internal = report["training"].get("internal_validation") or {}
    add('<h2 id="internal">Internal validation</h2>')
    boot = internal.get("bootstrap") or {}
    if boot.get("integrated"):
        rows = []
        for model in MODELS:
            block = boot[model]
            rows.append(
                [MODEL_LABELS[model], _num(block["apparent"]), _num(block["optimism"]), _num(block["corrected"])]
            )
        slope = boot.get("calibration_slope")
        if slope:
            rows.append(
                [
                    "Calibration slope (integrated)",
                    _num(slope["apparent"]),
                    _num(slope["optimism"]),
                    _num(slope["corrected"]),
                ]
            )
        add(_table(["Training split", "apparent", "optimism", "optimism-corrected"], rows, numeric=(1, 2, 3)))
        skipped = "; ".join(f"{count} × {reason}" for reason, count in boot.get("skipped", {}).items())
        add(
            f'<p class="note">{_e(boot["method"])}: {boot["resamples_used"]} of {boot["resamples"]} bootstrap '
            f"resamples (seed {boot['seed']}) refitted with <code>refit = {_e(boot['refit'])}</code>"
            + (
                " (the LASSO-Cox path down to the chosen alpha, then the integrated Cox of the kept clinical "
                "variables; the alpha is not cross-validated again)"
                if boot["refit"] == "fixed-alpha"
                else " (the whole method, cross-validation included)"
            )
            + "; optimism = mean(C on the resample − C of the refitted model on the training split)."
            + (f" Skipped: {_e(skipped)}." if skipped else "")
            + "</p>"
        )
    else:
        add(f"<p>Bootstrap optimism correction not available: {_e(boot.get('note') or 'not run')}.</p>")
    ph = internal.get("proportional_hazards") or {}
    if ph.get("terms"):
        add("<h3>Proportional hazards (integrated model, training)</h3>")
        add(
            _table(
                ["Term", "χ² (rank)", "p (rank)", "χ² (KM)", "p (KM)"],
                [
                    [t["name"], _num(t["statistic_rank"]), _p(t["p_rank"]), _num(t["statistic_km"]), _p(t["p_km"])]
                    for t in ph["terms"]
                ],
                numeric=(1, 2, 3, 4),
            )
        )
        add(
            f'<p class="note">{_e(ph["method"])}. A small p says the term\'s effect changes over follow-up, so '
            "one hazard ratio (and the predicted PFS at 6 and 12 months) describes it less well.</p>"
        )
    rows = []
    for split, entry in report["splits"].items():
        evaluation = entry.get("evaluation")
        if not evaluation:
            continue
        for model in MODELS:
            summary = evaluation[model].get("calibration_summary") or {}
            brier = evaluation[model].get("integrated_brier_score") or {}
            rows.append(
                [
                    _pretty_split(split),
                    MODEL_LABELS[model],
                    _ci(summary.get("slope"), summary.get("slope_ci_low"), summary.get("slope_ci_high"), 2),
                    _num(summary.get("intercept_log_o_e"), 2),
                    f"{summary.get('observed_events', 'NA')} / {_num(summary.get('expected_events'), 1)}",
                    _num(brier.get("model")),
                    _num(brier.get("kaplan_meier")),
                    summary.get("reason") or brier.get("reason") or "",
                ]
            )
    if rows:
        add("<h3>Calibration slope and intercept, integrated Brier score (per split)</h3>")
        add(
            _table(
                [
                    "Split",
                    "Model",
                    "slope (95% CI)",
                    "intercept log(O/E)",
                    "observed / expected events",
                    "IBS model",
                    "IBS Kaplan-Meier",
                    "note",
                ],
                rows,
                numeric=(2, 3, 4, 5, 6),
            )
        )
        add(
            '<p class="note">Slope: Cox coefficient of the linear predictor in the split (1 = ideal). Intercept: '
            "calibration-in-the-large, log(observed/expected events) up to the last horizon (0 = ideal; Crowson et "
            "al. 2016). IBS: integrated Brier score of the predicted PFS curves up to the last horizon "
            "(scikit-survival, IPCW from training), beside the training Kaplan-Meier curve given to everyone; "
            "lower is better.</p>"
        )


def _predictive_section(add, report: Mapping[str, Any], folder: Path) -> None:
    predictive = report.get("predictive")
    add('<h2 id="predictive">Treatment comparison: treated risk groups vs control (the paper\'s Figure 7)</h2>')
    if not predictive:
        add("<p>The cohort has no <code>control</code> split, so there is no treatment comparison.</p>")
        return
    if predictive.get("reason") or not predictive.get("pfs"):
        add(f"<p>Not computed: {_e(predictive.get('reason') or 'see warnings')}.</p>")
        return
    add(
        f"<p>Treated: splits {_e(', '.join(predictive['treated_splits']))} "
        f"(<code>evaluation.treated_splits = {_e(predictive['treated_rule'])}</code>); control: the "
        f"<code>control</code> split; risk groups: {_e(predictive['risk_groups'])}.</p>"
    )
    for endpoint, label in (("pfs", "PFS"), ("os", "OS")):
        block = predictive.get(endpoint)
        if not block:
            continue
        rows = []
        for group in ("high", "low"):
            entry = block["groups"][group]
            for versus, text in (
                ("vs_control", "all control patients"),
                ("vs_control_same_risk", f"control patients at {group} risk"),
            ):
                comparison = entry[versus]
                control = block["control"] if versus == "vs_control" else entry["control_same_risk"]
                logrank = comparison.get("logrank")
                rows.append(
                    [
                        f"{GROUP_LABELS[group]}, treated",
                        _median(entry["treated"]),
                        text,
                        _median(control),
                        _hr(comparison.get("hazard_ratio_treated_vs_control")),
                        _p((comparison.get("hazard_ratio_treated_vs_control") or {}).get("p")),
                        _p(logrank["p"] if logrank else None),
                        comparison.get("reason") or "",
                    ]
                )
        add(f"<h3>{label}</h3>")
        add(
            _table(
                [
                    "Treated group",
                    f"median {label} (95% CI)",
                    "versus",
                    f"median {label} (95% CI)",
                    "HR treated vs control (95% CI)",
                    "Wald p",
                    "log-rank p",
                    "note",
                ],
                rows,
                numeric=(1, 3, 4, 5, 6),
            )
        )
        interaction = block.get("interaction")
        if interaction:
            add(_table(["Term", "coef", "HR (95% CI)", "p"], _cox_rows(interaction["table"]), numeric=(1, 2, 3)))
            add(
                f"<p>Risk group × treatment interaction ({_e(interaction['model'])}, n = {interaction['n']}, "
                f"{interaction['events']} events): HR {_hr(interaction)}, p = {_p(interaction['p'])}. A small p says "
                "the treatment effect differs between the risk groups: the model is predictive of treatment benefit, "
                "not only prognostic.</p>"
            )
        else:
            add(f"<p>Interaction not estimable: {_e(block.get('reason') or 'see warnings')}.</p>")
    add(_figures_of(report, folder, "km-predictive"))


# --------------------------------------------------------------------------- writing


def write_report(
    report_dir: Path,
    report: dict[str, Any],
    *,
    model_mapping: Mapping[str, Any],
    timings_update: Callable[[], Mapping[str, float]] | None = None,
) -> ReportFiles:
    """Draw the figures and write report.json, report.html and model-card.md into ``report_dir``.

    ``report`` gets its ``figures`` and ``files`` keys filled in (and is
    written as report.json); ``model_mapping`` is the sealed model;
    ``timings_update``, called once the figures are drawn, adds to
    ``timings_seconds``.
    """
    from sclc_risk_node.research.model_card import render_model_card

    report_dir = Path(report_dir)
    folder = report_dir / FIGURES_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.png"):
        stale.unlink()
    report["figures"] = _draw_figures(report, folder)
    if timings_update is not None:
        report["timings_seconds"].update(timings_update())
    files = {"json": "report.json", "html": "report.html", "model_card": "model-card.md"}
    report["files"] = dict(files)
    card = render_model_card(model_mapping, splits=report["splits"], report=report)
    write_atomically(report_dir / files["model_card"], card)
    write_atomically(report_dir / files["html"], _render_html(report, report_dir))
    write_atomically(
        report_dir / files["json"], json.dumps(report, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    )
    return ReportFiles(
        json=report_dir / files["json"],
        html=report_dir / files["html"],
        model_card=report_dir / files["model_card"],
        figures=tuple(report_dir / f["file"] for f in report["figures"]),
    )
