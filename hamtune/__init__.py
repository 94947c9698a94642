"""hamtune: hyperparameter search for skin-lesion classification on HAM10000 with Ray Tune."""

__version__ = "0.1.0"
