"""Label CSVs, read with spreadsheet row numbers in every message: the ISIC-shaped one (an image column
and one 0/1 column per class) that ISIC and a user's own labels use, and binding a user's CSV to a dataset."""
from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from mirl.datasets.records import DatasetDescription, ImageRecord, image_files_by_stem
from mirl.errors import DataError

# Every message names the file and the row as a spreadsheet shows it: the header is row 1 and blank
# lines count, which is why blank lines are read as empty rows and dropped only after numbering.

_TOO_MANY_FIELDS = re.compile(r"Expected (\d+) fields in line (\d+), saw (\d+)")
_OPEN_QUOTE = re.compile(r"EOF inside string starting at row (\d+)")


def read_csv_checked(csv_path: Path, expected: str, **options) -> pd.DataFrame:
    """`pandas.read_csv` keeping blank lines as all-empty rows; each way it fails becomes one DataError.

    Only an empty cell is missing: pandas would also read NA, None, null, nan (a class, an image) as missing.
    """
    try:
        table = pd.read_csv(csv_path, skip_blank_lines=False, keep_default_na=False, na_values=[""], **options)
    except pd.errors.EmptyDataError:
        raise DataError(f"{csv_path} is empty; it should hold {expected}") from None
    except pd.errors.ParserError as error:
        message = " ".join(str(error).split())
        if match := _TOO_MANY_FIELDS.search(message):
            expected_fields, row, found = match.groups()
            raise DataError(f"{csv_path} row {row}: {found} values, but the header row has {expected_fields} "
                            "columns") from None
        if match := _OPEN_QUOTE.search(message):  # pandas counts this row from 0
            raise DataError(f"{csv_path} row {int(match.group(1)) + 1}: a quote opened here is never closed") from None
        raise DataError(f"{csv_path}: not a readable CSV file ({message})") from None
    except UnicodeDecodeError:
        raise DataError(f"{csv_path} row {first_undecodable_line(csv_path)}: not UTF-8 text; save the file as "
                        "UTF-8 CSV") from None
    except OSError as error:
        raise DataError(f"{csv_path} cannot be read ({error.strerror or type(error).__name__})") from None
    if not isinstance(table.index, pd.RangeIndex):
        # pandas silently turns the first column into an index when the first data row has one value too many
        raise DataError(f"{csv_path} row 2: {table.shape[1] + 1} values, but the header row has "
                        f"{table.shape[1]} columns")
    return table


def first_undecodable_line(path: Path) -> int:
    """The first line of a file that is not UTF-8 (pandas' error gives an offset within one chunk only).

    Splitting at newline bytes never cuts a character: no byte of a multi-byte UTF-8 character is one.
    """
    with open(path, "rb") as file:
        return next(number for number, line in enumerate(file, start=1) if not _is_utf8(line))


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _shown(value: object) -> str:
    """A CSV cell as a message shows it."""
    return "empty" if pd.isna(value) else repr(str(value))


def read_label_csv(csv_path: Path, root: Path, groups: dict[str, str] | None = None,
                   group_column: str | None = None) -> tuple[list[ImageRecord], tuple[str, ...], bool]:
    """An ISIC-shaped CSV: an image column, then one 0/1 column per class (1.0/0.0 accepted), and with
    `group_column` one more column naming each image's patient (or lesion, or study), which keeps a
    patient's images on one side of every split.

    Returns the records, the class names in column order, and whether the labels are multi-label
    (some row with several ones). Images are looked up by name under `root`. An image listed twice
    with the same labels is kept once; with other labels it is an error.
    """
    # without a header, pandas neither renames repeated column names nor guesses an index column
    raw = read_csv_checked(csv_path, "an image column and one 0/1 column per class", header=None, dtype=str)
    if group_column is not None:
        header = list(raw.iloc[0])
        if group_column not in header[1:]:
            raise DataError(f"{csv_path} row 1: no column {group_column} (--group-column); the columns are "
                            f"{','.join(map(str, header))}")
        position = header.index(group_column)
        group_cells = raw.iloc[1:, position]
        raw = raw.drop(columns=raw.columns[position])
        blank = raw.iloc[1:].isna().all(axis=1)
        missing = group_cells.isna() & ~blank
        if missing.any():
            raise DataError(f"{csv_path} row {missing.idxmax() + 1}: column {group_column} is empty")
        groups = {}
        for row, name, group in zip(raw.index[1:][~blank], raw.iloc[1:, 0][~blank], group_cells[~blank]):
            if groups.setdefault(name, (group, row))[0] != group:
                raise DataError(f"{csv_path} row {row + 1}: image {name} is in {group_column} {group!r} here but "
                                f"{groups[name][0]!r} in row {groups[name][1] + 1}")
        groups = {name: group for name, (group, _) in groups.items()}
    header = list(raw.iloc[0])
    if len(header) < 3:
        raise DataError(f"{csv_path} row 1: needs an image column and at least two class columns, found "
                        f"{','.join(map(str, header))}")
    for column, name in enumerate(header):
        if pd.isna(name) or not str(name).strip():
            raise DataError(f"{csv_path} row 1: column {column + 1} has no name")
        if header.index(name) != column:
            raise DataError(f"{csv_path} row 1: column {name} appears twice")
    classes = tuple(str(name) for name in header[1:])
    table = raw.iloc[1:].dropna(how="all")
    if table.empty:
        raise DataError(f"{csv_path} has a header but no rows")
    rows = table.index.to_numpy() + 1  # raw's index 0 is the header, row 1
    cells = table.iloc[:, 1:]
    values = cells.apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    bad = np.argwhere(~np.isin(values, [0.0, 1.0]))
    if len(bad):
        row, column = bad[0]
        raise DataError(f"{csv_path} row {rows[row]}: column {classes[column]} is "
                        f"{_shown(cells.iat[row, column])}, not 0 or 1")
    names = table.iloc[:, 0]
    first_of: dict[str, int] = {}  # image name to the position of its first row
    for position, name in enumerate(names):
        if pd.isna(name):
            raise DataError(f"{csv_path} row {rows[position]}: the image name is empty")
        first = first_of.setdefault(name, position)
        if first != position and not np.array_equal(values[first], values[position]):
            raise DataError(f"{csv_path} row {rows[position]}: image {name} appears with other labels than "
                            f"in row {rows[first]}")
    kept = np.fromiter(first_of.values(), dtype=np.int64, count=len(first_of))
    files = image_files_by_stem(root)
    records = []
    for position in kept:
        name = names.iat[position]
        if name not in files:
            raise DataError(f"{csv_path} row {rows[position]}: image {name} has no PNG, JPEG or DICOM file "
                            f"under {root}")
        if len(files[name]) > 1:
            shown = ", ".join(str(p.relative_to(root)) for p in files[name][:3])
            raise DataError(f"{csv_path} row {rows[position]}: image {name} names {len(files[name])} files under "
                            f"{root} ({shown}); rename all but one")
        records.append(ImageRecord(name, files[name][0], values[position].astype(np.float32),
                                   (groups or {}).get(name)))
    multilabel = bool((values[kept].sum(axis=1) != 1).any())
    return records, classes, multilabel


def with_label_csv(description: DatasetDescription, csv_path: Path, root: Path,
                   group_column: str | None = None) -> DatasetDescription:
    """The user's own labelled data under `root`: classes and multi-label-ness read from an ISIC-shaped CSV,
    patients from its `group_column` when given."""
    if not csv_path.is_file():
        raise DataError(f"label CSV {csv_path} does not exist")
    description.check_root(root)
    records, classes, multilabel = read_label_csv(csv_path, root, group_column=group_column)
    return replace(description, name=f"{description.name}:{csv_path.name}", classes=classes, multilabel=multilabel,
                   augment="paper",  # the modality of a user's images is unknown: the papers' recipes
                   find_labelled=lambda _: records, has_labels=lambda _: True,
                   volumes=None)  # a CSV names 2-D images: --dims 3 reads a dataset's own volumes
