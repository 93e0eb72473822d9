"""Rescoring policies and their Optuna search on GAP. Never imports TensorFlow."""
