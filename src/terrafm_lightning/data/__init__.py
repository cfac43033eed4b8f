"""The read path: tile reader, WorldCover-weighted sampler, multi-crop and the datamodule."""
