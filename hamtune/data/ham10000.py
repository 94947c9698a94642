"""HAM10000 constants: the fixed class order, diagnosis names and the metadata encoding used everywhere."""

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
METADATA_COLUMNS = ("lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization")
SEXES = ("male", "female", "unknown")
LOCALIZATIONS = (
    "abdomen", "acral", "back", "chest", "ear", "face", "foot", "genital", "hand", "lower extremity",
    "neck", "scalp", "trunk", "unknown", "upper extremity",
)
# age/100, sex one-hot, localization one-hot
META_DIM = 1 + len(SEXES) + len(LOCALIZATIONS)
