"""The reports room: every file and figure a person reads (report.md, metrics.json, tables, plots), written from
what the caller computed, each file atomically through hamtune.io.

    plots.py         the one matplotlib set-up: figures without pyplot, no display, no global state
    evaluation.py    an evaluation's files: predictions, per-class table, metrics.json, confusion matrix, report.md
    final.py         the final model's report: members and ensemble, calibration, seeds, split
    audit.py         subgroups, melanoma operating points and model card in report.md; roc_melanoma.png
    search_plots.py  a search's curves, metric against each hyperparameter, importance
    exploration.py   `hamtune data info`: the class table and the data's first figures

May import hamtune.data, hamtune.training (metrics), hamtune.vocab, hamtune.errors and hamtune.io; never the
search, final or serve rooms, which hand it what to write.
"""
