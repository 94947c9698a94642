"""The search room: a YAML spec becomes a Ray Tune search (OptunaSearch proposes, ASHA stops), whose results land
in results/<experiment>/ as tables a person can read.

    spec.py         YAML spec -> validated settings (pydantic sections) + Tune search space
    space.py        the `{distribution: args}` form of a space, parsed in this one place
    driver.py       which experiment, Ray's environment, the Tuner, resume; Ray is imported when a search starts
    searcher.py     OptunaSearch that knows pruned trials (its study in a journal file), random search, ASHA / FIFO
    startup.py      start-up points that cover every choice (stratified) and the continuous keys (Halton)
    scheduler.py    OrderedASHA: stop decisions in trial order, rungs rebuilt from the tables on resume
    lock.py         one search at a time per experiment
    warm_start.py   an earlier experiment's trials as the new searcher's first points
    trainable.py    the function Ray runs per trial (a thin adapter over hamtune.training.loop.fit)
    callbacks.py    tables kept current while trials run; checkpoints pruned as they end
    checkpoints.py  bounded disk: only the best few trials keep their best weights
    preflight.py    pretrained weights checked before trials start
    tables.py       trials and history tables, experiment records, the leaderboard
    savings.py      what early stopping saved
    importance.py   fANOVA importance of each searched hyperparameter
    choose.py       the best trial (or the top K) of an experiment, for the final model
    summary.py      what `hamtune search` and `hamtune results` print
    dashboard.py    `hamtune dashboard`: optuna-dashboard on the experiment's study
    tracking.py     MLflow checked and set up (trials are logged by Tune's MLflowLoggerCallback)

May import hamtune.data, hamtune.training, hamtune.reports, hamtune.vocab, hamtune.errors and hamtune.io; never
hamtune.final or hamtune.serve. Only driver.py, searcher.py, scheduler.py, callbacks.py and trainable.py import
Ray (and space.py, inside the function that builds the Tune space).
"""
