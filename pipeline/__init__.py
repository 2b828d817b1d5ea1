"""Offline data pipeline: WebVid-style CSV -> webdataset shards of N pre-sampled frames + caption."""
