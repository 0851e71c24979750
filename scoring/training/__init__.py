"""Fit, freeze and evaluate an integrated clinical + radiomics Cox model on a researcher's own cohort.

* `scoring.training.spec` -- the TOML training specification (`TrainingSpec`);
* `scoring.training.method` -- the method of Zhao et al. (JITC 2023) on a
  training split (`fit_integrated_model` -> `FittedIntegratedModel`);
* `scoring.training.evaluation` -- one split's evaluation of a frozen model
  (`evaluate_split`): C-index, time-dependent AUC, Kaplan-Meier by risk group,
  calibration and decision curves, for the radiomics score and the integrated
  risk score side by side; calibration slope and intercept, integrated Brier
  score, and the treatment comparison with a control split (`predictive_analysis`);
* `scoring.training.stability` -- the ICC perturbation stability screen before LASSO;
* `scoring.training.validation` -- internal validation: Harrell's bootstrap
  optimism-corrected C-index and calibration slope, the proportional-hazards test;
* `scoring.training.stats` -- Cox model, Kaplan-Meier, log-rank test matching R's ``survival``;
* `scoring.training.chest_phantom` -- the simulated cohort's chest CT phantom (also the demo study's).

Pure like the rest of `scoring`: arrays and tables in, plain values out.  Everything but `spec` and
`chest_phantom` needs the ``[train]`` extra (pandas, scikit-survival, lifelines), so this package
imports none of its modules itself: import them by name (``from sclc_risk_node.scoring.training.method
import fit_integrated_model``), and the service's demo study loads the phantom without them.
"""
