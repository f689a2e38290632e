"""Every byte in or out of storage, local or ``s3://``, through fsspec/s3fs.

Contract: writes are whole-object (a JSON document in one put, a Parquet file built on local disk,
checked, then uploaded in one call; nothing streams into a final key, so a crash never publishes
a truncated object); ``layout`` names every path inside a job's output; ``inputs`` lists, identifies
and reads input files by row range (``Shard``); ``modelcache`` brings an ``s3://`` model to each
node once; ``modelcheck`` reads a model's config and tokenizer files without torch. Imports
``spec`` and ``errors`` only.
"""
