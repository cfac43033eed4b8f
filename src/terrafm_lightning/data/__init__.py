"""Zarr store, data preparation and the streaming pretraining datamodule."""
