"""Text-embedding and latent caches: the on-disk format, the reader used by training.

- `format`  the file layout, cache keys and atomic writers/readers (the contract between the
            cache phase, which writes, and the train phase, which reads).
- `reader`  `CachedDataset`, `collate_cached`, `BucketBatchSampler` for training.
- `phase`   the cache phase itself (VAE + text encoder -> files), written with `format`.
"""
