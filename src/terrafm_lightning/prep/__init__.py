"""The write path: sources and passes that fill a store, driven by dask (`terrafm-data`)."""
