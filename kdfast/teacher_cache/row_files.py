"""Rows of a dataset on disk, read and written: a `datasets` folder (save_to_disk), .parquet files, or JSON lines.
Both ways stream, a record (or a parquet batch) at a time, so that a conversion holds little more than one example."""

from __future__ import annotations

import json
import shutil
import tempfile
from itertools import chain
from pathlib import Path

import numpy as np

ROWS_PER_READ = 64
# Stored dtypes: ids fit int32 (vocabularies stay far below 2^31), half the int64 that readers cast them back to.
STORED = {"teacher_logprobs": "float32", "target_logprobs": "float32", "target_mask": "int8", "attention_mask": "int8"}


def feature(name: str, value):
    import datasets

    stored = datasets.Value(STORED.get(name, "int32"))
    return datasets.Sequence(stored) if np.asarray(value).ndim == 1 else datasets.Sequence(datasets.Sequence(stored))


def records(source: Path):
    """Row dicts of a datasets folder, a .parquet file or a folder of them, or a .jsonl / .json file (JSON lines, or
    one array). Lists of numbers (and of equal-length lists of them) come as numpy arrays, read from Arrow without
    Python lists between."""
    if source.is_dir() and ((source / "state.json").exists() or (source / "dataset_info.json").exists()):
        import datasets

        dataset = datasets.load_from_disk(str(source))
        if isinstance(dataset, datasets.DatasetDict):
            if len(dataset) != 1:
                raise ValueError(f"{source} holds the splits {sorted(dataset)}: pass one split's folder")
            dataset = next(iter(dataset.values()))
        for table in dataset.with_format("arrow").iter(batch_size=ROWS_PER_READ):
            yield from _arrow_rows(table)
    elif source.is_dir() or source.suffix == ".parquet":
        import pyarrow.parquet as pq

        files = sorted(source.rglob("*.parquet")) if source.is_dir() else [source]
        if not files:
            raise ValueError(f"{source} is neither a datasets folder nor a folder of .parquet files")
        for file in files:
            for batch in pq.ParquetFile(file).iter_batches(batch_size=ROWS_PER_READ):
                yield from _arrow_rows(batch)
    elif source.suffix in (".jsonl", ".json"):
        with source.open() as lines:
            head = lines.read(1)
            lines.seek(0)
            if head == "[":
                yield from json.load(lines)
            else:
                yield from (json.loads(line) for line in lines if line.strip())
    else:
        raise ValueError(f"{source}: not a datasets folder, .parquet, .jsonl or .json")


def _arrow_rows(batch):
    columns = {name: batch.column(name) for name in batch.schema.names}
    for index in range(batch.num_rows):
        yield {name: _cell(column[index]) for name, column in columns.items()}


def _cell(scalar):
    """A list of numbers as a 1-D array, a list of equal-length lists of numbers as a 2-D one, anything else as
    Python values."""
    import pyarrow as pa
    import pyarrow.compute as pc

    values = scalar.values if isinstance(scalar, (pa.ListScalar, pa.LargeListScalar)) and scalar.is_valid else None
    if values is None or len(values) == 0 or values.null_count:
        return scalar.as_py()
    if _numeric(values.type):
        return values.to_numpy(zero_copy_only=False)
    if pa.types.is_list(values.type) or pa.types.is_large_list(values.type):
        flat, widths = values.flatten(), pc.min_max(pc.list_value_length(values)).as_py()
        if _numeric(flat.type) and not flat.null_count and widths["min"] == widths["max"]:
            return flat.to_numpy(zero_copy_only=False).reshape(len(values), widths["max"])
    return scalar.as_py()


def _numeric(kind) -> bool:
    import pyarrow as pa

    return pa.types.is_integer(kind) or pa.types.is_floating(kind)


def write(rows, out: Path, overwrite: bool = False) -> None:
    """The rows (dicts of arrays, all with the first's columns) as a datasets folder at `out`, or a .parquet / .jsonl
    / .json file by its suffix; streamed into an Arrow file beside it, then saved in the format asked for."""
    import datasets
    from datasets.arrow_writer import ArrowWriter

    rows = iter(rows)
    first = next(rows, None)
    if first is None:
        raise ValueError("no examples to write")
    features = datasets.Features({name: feature(name, value) for name, value in first.items()})
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as folder:
        arrow = Path(folder) / "rows.arrow"
        with ArrowWriter(features=features, path=str(arrow)) as writer:
            for index, row in enumerate(chain([first], rows)):
                if set(row) != set(features):
                    raise ValueError(f"example {index} has the columns {sorted(row)}, the first {sorted(features)}")
                writer.write({name: np.asarray(value) for name, value in row.items()})
            writer.finalize()
        dataset = datasets.Dataset.from_file(str(arrow), in_memory=False)
        if overwrite and out.is_dir():
            shutil.rmtree(out)
        elif overwrite and out.exists():
            out.unlink()
        if out.suffix == ".parquet":
            dataset.to_parquet(str(out))
        elif out.suffix in (".jsonl", ".json"):
            dataset.to_json(str(out))
        else:
            dataset.save_to_disk(str(out))
        del dataset  # its memory map closes before the folder goes
