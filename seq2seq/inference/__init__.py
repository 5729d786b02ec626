"""Decoding: safe checkpoint loading, search, translate, evaluate and attention heatmaps."""
