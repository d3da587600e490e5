"""Every file type LLaMA-Factory reads (json, jsonl, csv, parquet, arrow, txt, folders) gives the
same examples; Parquet and Arrow go through HF datasets and their errors still name the record."""

from __future__ import annotations

import csv
import io
import json

import pytest

from tuneforge.data import load_datasets
from tuneforge.errors import DataError

RECORDS = [{"instruction": f"Add {i} and {i}", "input": "", "output": f"{2 * i}"} for i in range(6)]


def _parquet(path, records):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(records), path)


def _arrow_stream(path, records):  # the file datasets' save_to_disk writes
    import pyarrow as pa

    table = pa.Table.from_pylist(records)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)


def _arrow_file(path, records):  # pyarrow's / pandas' Feather v2 file
    import pyarrow as pa

    table = pa.Table.from_pylist(records)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


def _csv(path, records):
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(records[0]))
    writer.writeheader()
    writer.writerows(records)
    path.write_text(out.getvalue())


WRITERS = {
    "d.json": lambda p, r: p.write_text(json.dumps(r)),
    "d.jsonl": lambda p, r: p.write_text("".join(json.dumps(x) + "\n" for x in r)),
    "d.csv": _csv,
    "d.parquet": _parquet,
    "d.arrow": _arrow_stream,
    "f.arrow": _arrow_file,
}


def _register(folder, entries):
    (folder / "dataset_info.json").write_text(json.dumps(entries))


@pytest.mark.parametrize("file_name", list(WRITERS))
def test_each_file_type_gives_the_same_examples(smol, make_args, tmp_path, file_name):
    WRITERS["d.json"](tmp_path / "ref.json", RECORDS)
    WRITERS[file_name](tmp_path / file_name, RECORDS)
    _register(tmp_path, {"ref": {"file_name": "ref.json"}, "d": {"file_name": file_name}})
    want = load_datasets(make_args(dataset="ref", dataset_dir=str(tmp_path)), smol).train
    got = load_datasets(make_args(dataset="d", dataset_dir=str(tmp_path)), smol).train
    assert got == want and len(got) == len(RECORDS)
    assert load_datasets(make_args(dataset="d", dataset_dir=str(tmp_path), max_samples=2), smol).train == \
        load_datasets(make_args(dataset="ref", dataset_dir=str(tmp_path), max_samples=2), smol).train


def test_text_files_for_pretraining(smol, make_args, tmp_path):
    (tmp_path / "t.txt").write_text("first line of text\nsecond line\n")
    _register(tmp_path, {"t": {"file_name": "t.txt"}})
    from tuneforge.data.text import TEXT

    train = load_datasets(make_args(dataset="t", dataset_dir=str(tmp_path), cutoff_len=4), smol, kind=TEXT).train
    assert "first line of text" in smol.decode([t for e in train for t in e["input_ids"]])


def test_a_folder_of_parquet_arrow_and_json_lines(smol, make_args, tmp_path):
    (tmp_path / "parts").mkdir()
    _parquet(tmp_path / "parts" / "1.parquet", RECORDS[:2])
    _arrow_stream(tmp_path / "parts" / "2.arrow", RECORDS[2:4])
    WRITERS["d.jsonl"](tmp_path / "parts" / "3.jsonl", RECORDS[4:])
    _register(tmp_path, {"parts": {"file_name": "parts"}})
    train = load_datasets(make_args(dataset="parts", dataset_dir=str(tmp_path)), smol).train
    labels = sorted(smol.decode([t for t in e["labels"] if t != -100]) for e in train)
    assert labels == sorted(f"{r['output']}<|im_end|>" for r in RECORDS)


def test_records_of_parquet_are_named_in_warnings_and_errors(smol, make_args, tmp_path, caplog):
    rows = [dict(r) for r in RECORDS]
    rows[3]["output"] = None  # a missing reply: pyarrow writes it as null
    _parquet(tmp_path / "d.parquet", rows)
    _parquet(tmp_path / "n.parquet", [{**r, "output": 7} for r in RECORDS])  # numbers, not text
    _register(tmp_path, {"d": {"file_name": "d.parquet"}, "n": {"file_name": "n.parquet"}})
    assert len(load_datasets(make_args(dataset="d", dataset_dir=str(tmp_path)), smol).train) == 5
    assert f"(first: '{tmp_path / 'd.parquet'}' record 3)" in caplog.text
    with pytest.raises(DataError) as caught:
        load_datasets(make_args(dataset="n", dataset_dir=str(tmp_path)), smol)
    assert f"'{tmp_path / 'n.parquet'}' record 0" in str(caught.value)


def test_a_damaged_parquet_file_is_one_line(smol, make_args, tmp_path):
    (tmp_path / "d.parquet").write_bytes(b"PAR1 not really parquet PAR1")
    _register(tmp_path, {"d": {"file_name": "d.parquet"}})
    with pytest.raises(DataError) as caught:
        load_datasets(make_args(dataset="d", dataset_dir=str(tmp_path)), smol)
    message = str(caught.value)
    assert message.startswith(f"dataset 'd' file '{tmp_path / 'd.parquet'}' cannot be read as Parquet (")
    assert "\n" not in message
