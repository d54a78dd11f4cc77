"""Training engine: data (datasets, captions, buckets), methods, the accelerate loop, export."""
