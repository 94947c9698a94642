"""The final-model room: the chosen configuration retrained on train+val (one network or an ensemble), calibrated
on a held-back slice, tested once, saved as a model file; and that file used on new images.

    best.py         `hamtune best`: the best trials described, optionally retrained
    retrain.py      retrain + ensemble + calibration + the single test; writes best/
    calibration.py  temperature and class-bias calibration, decision weights, the lesion-grouped hold-out
    audit.py        the final test's audit: subgroups, melanoma operating points, model card
    tracking.py     the final model logged to MLflow when its search logged there
    modelfile.py    model.pt: one network or an ensemble plus its calibration; save and load (weights_only)
    inference.py    evaluate (an external labelled set) and predict (unlabelled images) with a saved model

May import hamtune.data, hamtune.training, hamtune.search (choosing the best trial), hamtune.reports and the shared
modules; never hamtune.serve.
"""
