"""Bundled detectors (FCOS-OTA, DETR) that train with :mod:`uotmatch` assignment."""
