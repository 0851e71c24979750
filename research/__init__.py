"""The research side: fit, evaluate and report a model on a researcher's own cohort; survival statistics.

Installed with the ``[train]`` extra's dependencies (pandas, dask, tqdm, scikit-survival, lifelines);
the service (`node`) never imports this package (tests/test_layering.py).  The pure parts, arrays and
tables in and plain values out, live in `scoring.training`; here is what reads or writes files:

* `cli` -- the research commands (``train``, ``simulate-cohort``, ``stats``); ``sclc-node`` hands them here;
* `training_cli` -- ``train`` and ``simulate-cohort``; `stats_cli` -- ``stats cox|km|logrank``;
* `cohort` -- the cohort CSV; `extraction` -- cohort feature extraction from DICOM (local or Dask);
* `simulate` -- a simulated cohort written as DICOM;
* `report` -- the training report (HTML, JSON, figures); `model_card` -- the markdown model card.
"""
