"""The search room: a YAML spec becomes a Ray Tune search (OptunaSearch proposes, ASHA stops), whose results land
in results/<experiment>/ as tables a person can read.

    spec.py         YAML spec -> validated settings (pydantic sections) + Tune search space
    space.py        the `{distribution: args}` form of a space, parsed in this one place
    driver.py       which experiment, Ray's environment, the Tuner, resume; Ray is imported when a search starts
    searcher.py     OptunaSearch that knows pruned trials, random search, ASHA / FIFO
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

May import hamtune.data, hamtune.training, hamtune.reports, hamtune.vocab, hamtune.errors and hamtune.io; never
hamtune.final or hamtune.serve. Only driver.py, searcher.py, callbacks.py and trainable.py import Ray.
"""
