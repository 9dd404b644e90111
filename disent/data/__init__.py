"""Data: sources -> pre-grouped WebDataset shards (`disent prepare`), streamed as same-class pairs.

Modules: sources/sprites (inputs), prepare (writing), manifest, shards (reading one shard),
stream (PairLoader, load_split_arrays), s3 (boto3 opener and helpers), storage (local or S3).
See docs/data.md.
"""
