"""Shard URLs of a ``path`` and what identifies each object's current version.

``path`` is one shard URL, a "directory" URL (the shards its converter ``MANIFEST.json`` lists,
else its ``*.tar``), a glob (``s3://bucket/train/shard-00*.tar``) or a list of such URLs (one
protocol per source). Each shard's info (size, ETag...) comes from the listings made on the way,
one listing per parent directory holding 8 or more shards, else one ``info`` request per shard.
:func:`version_of` (``"size:etag"``) and :func:`cache_key` (a file name from the URL and version)
key the shard cache and the locally kept indexes, so a changed object is a new entry.
"""
from __future__ import annotations

import hashlib
import json
import re
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from ..errors import DataError
from .fs import RemoteStore

__all__ = ["resolve_urls", "object_infos", "version_of", "cache_key"]


def _listing(store: RemoteStore, url: str) -> Dict[str, Dict]:
    """``{url: info}`` of the ``*.tar`` objects under directory ``url`` (one listing request)."""
    try:
        entries = store.call(url, store.fs.ls, store.strip(url), detail=True, what="listing")
    except DataError as e:
        if isinstance(e.__cause__, (FileNotFoundError, NotADirectoryError)):
            return {}
        raise
    return {store.url(d["name"]): d for d in entries
            if str(d["name"]).endswith(".tar") and d.get("type") != "directory"}


def _manifest_urls(store: RemoteStore, url: str) -> Optional[List[str]]:
    from ..shards import MANIFEST_FORMAT, MANIFEST_NAME
    murl = url.rstrip("/") + "/" + MANIFEST_NAME
    try:
        text = store.call(murl, store.fs.cat_file, store.strip(murl), what="manifest")
    except DataError as e:
        if isinstance(e.__cause__, FileNotFoundError):
            return None
        raise
    try:
        m = json.loads(text)
    except ValueError:
        return None
    if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT or m.get("kind") != "shards":
        return None
    if not m.get("complete"):
        raise DataError(f"shards URL '{url}' holds an unfinished conversion ({murl})")
    return [url.rstrip("/") + "/" + str(s["file"]) for s in m.get("shards", [])]


def resolve_urls(store: RemoteStore, path) -> Tuple[List[str], Dict[str, Dict]]:
    """Shard URLs of ``path`` (URL, directory URL, glob URL or list) and the infos found on the way."""
    if isinstance(path, (list, tuple)):
        urls, infos = [], {}
        for p in path:
            u, i = resolve_urls(store, p)
            urls += u
            infos.update(i)
        return urls, infos
    url = str(path)
    if any(c in url.split("://", 1)[1] for c in "*?["):
        found = store.call(url, store.fs.glob, store.strip(url), detail=True, what="glob")
        infos = {store.url(k): v for k, v in found.items() if k.endswith(".tar") and v.get("type") != "directory"}
        return sorted(infos), infos
    if url.endswith(".tar"):
        return [url], {}
    listed = _manifest_urls(store, url)
    infos = _listing(store, url)
    if listed is not None:
        return listed, infos
    if not infos:
        raise DataError(f"shards URL '{url}': no such object, and no .tar objects under it")
    return sorted(infos), infos


def object_infos(store: RemoteStore, urls: Sequence[str], known: Dict[str, Dict]) -> List[Dict]:
    """Info (size, ETag...) per URL: one listing per parent directory holding 8 or more of them
    (not listed yet), else one ``info`` request per URL."""
    parents: Dict[str, int] = {}
    for u in urls:
        if u not in known:
            parents[u.rsplit("/", 1)[0]] = parents.get(u.rsplit("/", 1)[0], 0) + 1
    out = []
    for u in urls:
        parent = u.rsplit("/", 1)[0]
        if u not in known and parents.get(parent, 0) >= 8:
            parents[parent] = 0  # listed once
            known.update(_listing(store, parent))
        if u not in known:  # not listable (https) or missing: ask for the object itself
            known[u] = store.call(u, store.fs.info, store.strip(u), what="info")
        out.append(known[u])
    return out


def version_of(info: Mapping) -> str:
    """``"size:tag"`` of an object's info (ETag, md5 or modification time; ``"size:"`` without one)."""
    tag = info.get("ETag") or info.get("etag") or info.get("md5Hash") or info.get("LastModified") \
        or info.get("mtime") or info.get("updated") or ""
    return f"{int(info['size'])}:{str(tag).strip(chr(34))}"


def cache_key(url: str, version: str) -> str:
    """A file-name-safe key of ``url`` at ``version``: a hash of both, then the shard's name."""
    h = hashlib.blake2b(f"{url}\0{version}".encode(), digest_size=10).hexdigest()
    name = re.sub(r"[^A-Za-z0-9._-]", "_", url.rsplit("/", 1)[-1].removesuffix(".tar"))[-80:]
    return f"{h}-{name}"

