"""WebDataset shards in object storage: fsspec URLs, ranged reads with retries, a local shard cache.

``type: shards`` takes ``s3://``, ``gs://``, ``https://`` (any fsspec protocol) URLs beside local
paths: one shard URL, a "directory" URL (the shards its converter ``MANIFEST.json`` lists, else
its ``*.tar``), a glob (``s3://bucket/train/shard-00*.tar``) or a list of such URLs (one
protocol per source). :class:`RemoteShards` is the remote half of
:class:`loaders.shards.ShardSource`: the source keeps the per-sample index arrays and checks, this
package fetches bytes. One job per module:

* :mod:`.fs`: URLs, the filesystem of one protocol, the credentials check (never from a config
  file), requests bounded by ``timeout_s`` and retried with backoff, errors naming the URL;
* :mod:`.stats`: :data:`STATS`, this process's requests, bytes and cache use;
* :mod:`.resolve`: a ``path`` to shard URLs, their sizes and versions (ETag);
* :mod:`.cache`: the whole-shard LRU cache on local disk, shared by processes (``cache_dir``);
* :mod:`.index`: each shard's ``.tar.idx``, fetched and verified, or built and uploaded;
* :mod:`.reader`: :class:`RemoteShards`, per-sample ranged reads, batched prefetch of merged runs;
* :mod:`.upload`: converters writing to a URL (convert locally, then upload, manifest last).
"""
from __future__ import annotations

from .cache import ShardCache
from .fs import SECRET_KEYS, RemoteStore, check_no_secrets, is_url
from .reader import MAX_RUN, MERGE_GAP, RemoteShards, merge_ranges, open_shards
from .resolve import resolve_urls
from .stats import STATS, reset_stats
from .upload import to_remote_shards

__all__ = ["is_url", "check_no_secrets", "RemoteStore", "ShardCache", "RemoteShards", "STATS", "reset_stats",
           "merge_ranges", "open_shards", "to_remote_shards", "SECRET_KEYS", "MERGE_GAP", "MAX_RUN", "resolve_urls"]
