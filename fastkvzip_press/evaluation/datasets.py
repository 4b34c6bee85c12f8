"""The names of the locally generated datasets (:func:`~fastkvzip_press.evaluation.comparison.make_dataset` makes
them), apart so the command line lists them without importing transformers."""

# Local datasets: not kvpress's hub datasets, hence their own names (results never pass for the hub's).
DATASETS = ("ruler-local", "niah-local")
