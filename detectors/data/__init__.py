"""Datasets the project generates itself (no downloads)."""
