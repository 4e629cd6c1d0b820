"""Rows of study results (one dict per row, the same keys in each) as CSV files."""
import csv


def write_csv(path: str, rows: list[dict]) -> None:
  """Writes `rows` to `path` with a header of the first row's keys."""
  with open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
