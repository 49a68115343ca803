"""Sensing helpers shared by stages: media decoding (media.py), faces (faces.py), speech (speech.py)."""
