"""Datasets, splits and transforms."""
