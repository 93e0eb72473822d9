"""From Kaggle's files to per-image predictions, and the `glr` command line."""
