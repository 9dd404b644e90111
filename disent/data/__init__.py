"""Data: sources -> pre-grouped WebDataset shards (`disent prepare`), streamed as same-class pairs.

Modules: sources/sprites (inputs), prepare (writing), manifest, shards (reading one shard),
stream (PairLoader, load_split_arrays). Files and objects are read and written through disent.io.
See docs/data.md.
"""
