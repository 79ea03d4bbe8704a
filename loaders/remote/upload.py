"""Converters writing to a URL: convert into a local temporary directory, then upload.

``fastssl data shards --out s3://bucket/train/`` (:func:`loaders.convert.to_shards` with a URL
``out_dir``) converts into ``$FASTSSL_TMPDIR`` (default the system temp), then uploads the shards
and their indexes, and the manifest last, so a reader never sees a manifest before the files it
lists. A non-empty destination is refused unless ``existing == "overwrite"`` and a fastssl
manifest there lists every object (those are deleted first); ``resume`` is refused for a URL.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, List, Mapping, Optional

from ..errors import DataError
from .fs import RemoteStore, protocol_of

__all__ = ["to_remote_shards"]


def _claim_remote(store: RemoteStore, url: str, existing: str) -> None:
    """Refuse a non-empty remote ``url`` unless ``existing == "overwrite"`` and a fastssl manifest
    there lists every object (those are deleted first); ``resume`` is not supported remotely."""
    from ..shards import MANIFEST_NAME, read_manifest
    st = store
    try:
        names = [d["name"] for d in st.call(url, st.fs.find, st.strip(url), detail=True, what="listing").values()]
    except DataError as e:
        if not isinstance(e.__cause__, FileNotFoundError):
            raise
        names = []
    if not names:
        return
    base = st.strip(url).rstrip("/")
    rel = sorted(n[len(base) + 1:] for n in names)
    if existing == "resume":
        raise DataError(f"--resume is not supported for a remote --out ('{url}' holds {len(rel)} objects): convert "
                        f"into a local directory with --resume and upload it, or pass --overwrite")
    if existing != "overwrite":
        raise DataError(f"output '{url}' holds {len(rel)} objects ({', '.join(rel[:3])}...); pass --overwrite to "
                        f"replace an earlier conversion there")
    with tempfile.TemporaryDirectory() as tmp:
        if MANIFEST_NAME in rel:
            Path(tmp, MANIFEST_NAME).write_bytes(st.call(url, st.fs.cat_file, f"{base}/{MANIFEST_NAME}"))
        m = read_manifest(tmp, strict=False) or {}
    listed = set(m.get("files", [])) | set(m.get("pending", [])) | {MANIFEST_NAME}
    stray = [r for r in rel if r not in listed]
    if stray:
        raise DataError(f"output '{url}' holds {len(stray)} object(s) no fastssl {MANIFEST_NAME} lists "
                        f"({', '.join(stray[:5])}); they are never deleted: remove them or choose another --out")
    st.call(url, st.fs.rm, [f"{base}/{r}" for r in rel if r != MANIFEST_NAME] + [f"{base}/{MANIFEST_NAME}"],
            what="delete")


def to_remote_shards(convert: Callable, source, url: str, *, existing: str = "refuse",
                     storage_options: Optional[Mapping] = None, **kw) -> List[str]:
    """``convert(source, local_dir, **kw)`` (:func:`loaders.convert.to_shards`) into a temporary local
    directory, then upload its shards and indexes to ``url`` and the manifest last (a reader never
    sees a manifest before the files it lists). Returns the shard URLs."""
    from ..shards import MANIFEST_NAME, read_manifest
    store = RemoteStore(protocol_of(url), storage_options)
    _claim_remote(store, url, existing)
    base = url.rstrip("/")
    with tempfile.TemporaryDirectory(prefix="fastssl-shards-", dir=os.environ.get("FASTSSL_TMPDIR")) as tmp:
        paths = convert(source, tmp, **kw)
        names = list(read_manifest(tmp)["files"])
        for name in names:
            store.call(f"{base}/{name}", store.fs.put_file, os.path.join(tmp, name),
                       store.strip(f"{base}/{name}"), what="upload", bounded=False)
        store.call(f"{base}/{MANIFEST_NAME}", store.fs.put_file, os.path.join(tmp, MANIFEST_NAME),
                   store.strip(f"{base}/{MANIFEST_NAME}"), what="upload", bounded=False)
    return [f"{base}/{Path(p).name}" for p in paths]
