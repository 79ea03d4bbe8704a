"""CSV/Parquet file lists (loaders.lists): the same paths and labels as Python's csv module reads,
Parquet == CSV, arrays memory-mapped and shared (a pickled source is tiny), a 1M-row list opens
fast, and errors name the file and the line/row/column."""
import csv
import mmap
import os
import pickle
import time

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from loaders import lists  # noqa: E402
from loaders.base import build_source  # noqa: E402
from loaders.errors import DataError  # noqa: E402
from loaders.sources import CSVSource, ParquetSource  # noqa: E402


def reference(path, path_column="path", label_column=None):
    """What CSVSource read before loaders.lists: the csv module, stripped cells, blank rows skipped."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f))
    header = [h.strip() for h in rows[0]]
    pcol = header.index(path_column)
    lcol = None if label_column is None else header.index(label_column)
    paths, labels = [], []
    for row in rows[1:]:
        if not row or all(not c.strip() for c in row):
            continue
        paths.append(row[pcol].strip())
        cell = row[lcol].strip() if lcol is not None and len(row) > lcol else ""
        labels.append(int(cell) if cell else -1)
    return paths, labels


def contents(src):
    return [src.image_path(i) for i in range(len(src))], src.labels().tolist()


# quoting, commas and doubled quotes inside paths, unicode, CRLF, blank lines, extra columns,
# empty and negative labels, a header with spaces and a BOM: all on pyarrow's fast path
REGULAR = ('\ufeff id , path ,label,note\r\n'
           '0,a/b.jpg,3,x\r\n'
           '1,"c,d/e f.png",,"quoted, note"\r\n'
           '\r\n'
           '2,"g""h"".jpg",-7,\r\n'
           '3,ünï/çödé 画像.webp,12,z\r\n'
           '4,"multi\nline.jpg",0,\r\n'
           '5,tail_ü.jpg,007,\r\n')
# only the csv-module reading handles these exactly: whitespace around a path and a label, a row of
# blank cells, a short (ragged) row, a '+' sign, Unicode whitespace (U+3000) around a path
IRREGULAR = ('path,label\n'
             ' a.jpg ,1\n'
             'b.jpg, 4 \n'
             ' , \n'
             'c.jpg\n'
             'd.jpg,+5\n'
             '\u3000e.jpg\u3000,6\n')


@pytest.mark.parametrize("text,fast", [(REGULAR, True), (IRREGULAR, False)], ids=["regular", "irregular"])
def test_csv_equals_csv_module(tmp_path, monkeypatch, text, fast):
    p = tmp_path / "list.csv"
    p.write_bytes(text.encode("utf-8"))
    used = []
    orig = lists._csv_python
    monkeypatch.setattr(lists, "_csv_python", lambda *a: (used.append(1), orig(*a))[1])
    for cache in (None, tmp_path / "cache"):
        used.clear()
        src = CSVSource(path=p, label_column="label", cache_dir=cache)
        assert contents(src) == reference(p, label_column="label")
        assert used == ([] if fast else [1])
        assert src.labels().dtype == np.int64
    # no label column: -1 everywhere; root joins
    src = CSVSource(path=p, root="/data")
    paths, _ = reference(p)
    assert contents(src) == ([os.path.join("/data", q) for q in paths], [-1] * len(paths))


def test_parquet_equals_csv(tmp_path):
    rng = np.random.default_rng(0)
    names = [f"cls{c}/ï{i}_{'x' * int(rng.integers(0, 40))}.jpg" for i, c in enumerate(rng.integers(0, 9, 500))]
    labels = rng.integers(-1, 1000, 500)
    table = pa.table({"file": pa.array(names), "y": pa.array(labels, pa.int32()), "extra": pa.array(labels * 2)})
    pq.write_table(table, tmp_path / "l.parquet", row_group_size=128)
    with open(tmp_path / "l.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["file", "y"])
        w.writerows(zip(names, labels.tolist()))
    for cache in (None, tmp_path / "cache"):
        a = build_source({"type": "parquet", "path": str(tmp_path / "l.parquet"), "path_column": "file",
                          "label_column": "y", "cache_dir": None if cache is None else str(cache)})
        b = CSVSource(path=tmp_path / "l.csv", path_column="file", label_column="y", cache_dir=cache)
        assert isinstance(a, ParquetSource) and contents(a) == contents(b) == (names, labels.tolist())
    # pandas-style labels: float with NaN for the gaps; large_string paths; nulls -> -1
    t2 = pa.table({"path": pa.array(["a", "b", "c"], pa.large_string()), "label": pa.array([1.0, np.nan, 3.0])})
    pq.write_table(t2, tmp_path / "f.parquet")
    assert contents(ParquetSource(path=tmp_path / "f.parquet", label_column="label")) == (["a", "b", "c"], [1, -1, 3])
    t3 = pa.table({"path": ["a", "b"], "label": pa.array([None, 2], pa.int64())})
    pq.write_table(t3, tmp_path / "n.parquet")
    assert contents(ParquetSource(path=tmp_path / "n.parquet", label_column="label")) == (["a", "b"], [-1, 2])


def _base_is_mmap(a):
    while a is not None and not isinstance(a, mmap.mmap):
        a = getattr(a, "base", None) if not isinstance(a, (bytes, memoryview)) else (
            a.obj if isinstance(a, memoryview) else None)
    return isinstance(a, mmap.mmap)


def test_arrays_are_memory_mapped_and_not_pickled(tmp_path):
    n = 50_000
    p = tmp_path / "big.csv"
    p.write_text("path,label\n" + "".join(f"dir{i % 97}/img_{i:07d}.jpg,{i % 1000}\n" for i in range(n)))
    src = CSVSource(path=p, label_column="label", cache_dir=tmp_path / "cache")
    blob, offsets, labels = src._paths.arrays
    assert all(_base_is_mmap(a) for a in (blob, offsets, labels))
    data = pickle.dumps(src)
    assert len(data) < 2000 < blob.nbytes // 100  # the folder name, not the ~1 MB of arrays
    clone = pickle.loads(data)
    assert contents(clone) == contents(src) and _base_is_mmap(clone._paths.arrays[0])
    labels[0] = 5  # copy-on-write: writable for callers, the cache file is unchanged
    assert CSVSource(path=p, label_column="label", cache_dir=tmp_path / "cache").labels()[0] == 0


def test_default_cache_dir_small_lists_in_memory_and_invalidation(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTSSL_CACHE_DIR", str(tmp_path / "c"))
    small = tmp_path / "s.csv"
    small.write_text("path\na.jpg\n")
    assert contents(CSVSource(path=small)) == (["a.jpg"], [-1]) and not (tmp_path / "c").exists()
    monkeypatch.setattr(lists, "MEMORY_MAX_BYTES", 1)
    src = CSVSource(path=small)
    assert len(list((tmp_path / "c" / "lists").glob("s-*/meta.json"))) == 1 and len(pickle.dumps(src)) < 2000
    small.write_text("path\nb.jpg\nc.jpg\n")  # new size: a new entry, never the stale one
    assert contents(CSVSource(path=small)) == (["b.jpg", "c.jpg"], [-1, -1])
    assert len(list((tmp_path / "c" / "lists").glob("s-*/meta.json"))) == 2


def test_million_rows_open_fast(tmp_path):
    n = 1_000_000
    i = np.arange(n)
    path = pa.compute.binary_join_element_wise("n", pa.compute.cast(pa.array(i % 1000), pa.string()), "/img_",
                                               pa.compute.cast(pa.array(i), pa.string()), ".JPEG", "")
    import pyarrow.csv as pacsv
    pacsv.write_csv(pa.table({"path": path, "label": pa.array(i % 1000)}), tmp_path / "m.csv",
                    write_options=pacsv.WriteOptions(quoting_style="none"))
    t0 = time.perf_counter()
    src = CSVSource(path=tmp_path / "m.csv", label_column="label", cache_dir=tmp_path / "cache")
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    again = CSVSource(path=tmp_path / "m.csv", label_column="label", cache_dir=tmp_path / "cache")
    cached = time.perf_counter() - t0
    assert len(src) == len(again) == n
    assert first < 20 and cached < 1, (first, cached)  # ~0.5 s and ~1 ms on a quiet 2-core machine
    for k in (0, 1, 999_999, 123_457):
        assert again.image_path(k) == f"n{k % 1000}/img_{k}.JPEG" and again.labels()[k] == k % 1000


def test_errors_name_file_and_line_or_row(tmp_path):
    def csv_file(name, text):
        p = tmp_path / name
        p.write_text(text)
        return p

    with pytest.raises(DataError, match=r"bad\.csv' line 4: label 'cat' in column 'label' is not an integer"):
        CSVSource(path=csv_file("bad.csv", "path,label\na,1\n\nb,cat\n"), label_column="label")
    with pytest.raises(DataError, match=r"hole\.csv' line 3: empty 'path'"):
        CSVSource(path=csv_file("hole.csv", "path,label\na,1\n,2\n"), label_column="label")
    with pytest.raises(DataError, match=r"cols\.csv' has no column 'label' \(label_column\); columns: path, y"):
        CSVSource(path=csv_file("cols.csv", "path,y\na,1\n"), label_column="label")
    with pytest.raises(DataError, match=r"utf\.csv' is not UTF-8"):
        (tmp_path / "utf.csv").write_bytes(b"path\n\xff\xfe.jpg\n")
        CSVSource(path=tmp_path / "utf.csv")
    pq.write_table(pa.table({"path": ["a", None, "c"], "label": [1, 2, 3]}), tmp_path / "null.parquet")
    with pytest.raises(DataError, match=r"null\.parquet' row 1: 'path' is null"):
        ParquetSource(path=tmp_path / "null.parquet")
    pq.write_table(pa.table({"path": ["a", "b", ""]}), tmp_path / "empty.parquet")
    with pytest.raises(DataError, match=r"empty\.parquet' row 2: empty 'path'"):
        ParquetSource(path=tmp_path / "empty.parquet")
    pq.write_table(pa.table({"path": ["a"], "label": ["x"]}), tmp_path / "str.parquet")
    with pytest.raises(DataError, match=r"str\.parquet': label column 'label' must hold integers, got string"):
        ParquetSource(path=tmp_path / "str.parquet", label_column="label")
    pq.write_table(pa.table({"path": ["a", "b"], "label": [1.0, 2.5]}), tmp_path / "frac.parquet")
    with pytest.raises(DataError, match=r"frac\.parquet' row 1: label 2.5 in column 'label' is not an integer"):
        ParquetSource(path=tmp_path / "frac.parquet", label_column="label")
    with pytest.raises(DataError, match=r"str\.parquet' has no column 'file' \(path_column\); columns: path, label"):
        ParquetSource(path=tmp_path / "str.parquet", path_column="file")
    with pytest.raises(DataError, match=r"no\.parquet' cannot be read as Parquet"):
        ParquetSource(path=csv_file("no.parquet", "path\na\n"))
    with pytest.raises(DataError, match=r"missing\.parquet' cannot be opened"):
        ParquetSource(path=tmp_path / "missing.parquet")


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_list_sources_through_loader_workers(tmp_path, kind):
    """2 DataLoader workers read a memory-mapped list: every sample's pixels and label, by index."""
    from PIL import Image

    from loaders.pipeline import build_loader
    imgs = np.random.default_rng(1).integers(0, 256, (12, 8, 8, 3), dtype=np.uint8)
    names = [f"d{i % 3}/ï{i}.png" for i in range(12)]
    for name, img in zip(names, imgs):
        (tmp_path / "img" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(tmp_path / "img" / name)
    table = pa.table({"path": names, "label": list(range(100, 112))})
    if kind == "csv":
        import pyarrow.csv as pacsv
        pacsv.write_csv(table, tmp_path / "l.csv")
    else:
        pq.write_table(table, tmp_path / "l.parquet")
    src = {"name": "l", "type": kind, "path": str(tmp_path / f"l.{kind}"), "root": str(tmp_path / "img"),
           "label_column": "label", "cache_dir": str(tmp_path / "cache")}
    loader = build_loader({"sources": [src], "budget": 12, "batch_size": 4, "num_workers": 2, "seed": 3,
                           "crop_in_decode": False, "image_size": 8})
    seen = []
    for b in loader:
        for j, i in enumerate(b.index.tolist()):
            assert b.label[j] == 100 + i
            np.testing.assert_array_equal(b.views[0][j].permute(1, 2, 0).numpy(), imgs[i])
            seen.append(i)
    assert sorted(seen) == list(range(12))
