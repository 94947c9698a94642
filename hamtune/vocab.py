"""The words every part of hamtune shares: the diagnoses and their order, the metadata encoding's vocabulary, the
imbalance strategies, and the trial statuses of a search.

A leaf module (no hamtune imports, nothing heavy): any module may import it, so each word is spelled once.
"""

from __future__ import annotations

# One class order for the whole product: labels, model outputs, reports and saved models all use it.
CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
NUM_CLASSES = len(CLASSES)
DIAGNOSES = {
    "akiec": "Actinic keratoses / intraepithelial carcinoma",
    "bcc": "Basal cell carcinoma",
    "bkl": "Benign keratosis",
    "df": "Dermatofibroma",
    "mel": "Melanoma",
    "nv": "Melanocytic nevus",
    "vasc": "Vascular lesions",
}
# Class frequencies of the full HAM10000 release (10,015 images).
HAM10000_FREQUENCIES = {
    "akiec": 0.033, "bcc": 0.051, "bkl": 0.110, "df": 0.011, "mel": 0.111, "nv": 0.669, "vasc": 0.014,
}
# The ISIC 2018 Task 3 ground-truth column order (one-hot per image), as the challenge's files and scorer use it.
ISIC_COLUMNS = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")

# HAM10000's metadata, and the model's encoding of it: age/100, sex one-hot, localization one-hot.
METADATA_COLUMNS = ("lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization")
SEXES = ("male", "female", "unknown")
LOCALIZATIONS = (
    "abdomen", "acral", "back", "chest", "ear", "face", "foot", "genital", "hand", "lower extremity",
    "neck", "scalp", "trunk", "unknown", "upper extremity",
)
META_DIM = 1 + len(SEXES) + len(LOCALIZATIONS)
# How a diagnosis was confirmed (dx_type): histopathology, follow-up, expert consensus, in-vivo confocal microscopy.
DX_TYPES = ("histo", "follow_up", "consensus", "confocal")

IMBALANCE_STRATEGIES = ("none", "weighted_loss", "oversample", "focal")
OPTIMIZERS = ("adamw", "sgd")

# Trial statuses, as the trials table and every reader of it spell them.
COMPLETED = "completed"  # ran all its epochs
STOPPED = "stopped"  # stopped early by ASHA
NON_FINITE = "non_finite"  # its loss turned NaN/inf; ended alone
ERROR = "error"  # an input error (one-line message) or a crash Tune gave up retrying
RUNNING = "running"
PENDING = "pending"
PAUSED = "paused"
INTERRUPTED = "interrupted"  # the search stopped (Ctrl-C, a killed driver) while it ran: a resume continues it
TRIAL_STATUSES = (COMPLETED, STOPPED, NON_FINITE, ERROR, RUNNING, PENDING, PAUSED, INTERRUPTED)
RAN_TO_END = (COMPLETED, STOPPED)  # all epochs, or until ASHA cut them: what model selection and importance rank
ENDED = (COMPLETED, STOPPED, NON_FINITE, ERROR)  # will never run again
