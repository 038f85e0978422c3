"""Text classification: the build's labelled texts, read through ``edgekit.data``, and how they become tensors.

Rows carry a text, a label and (optionally) a split; ``edgekit.data`` reads
CSV/TSV, JSONL, Parquet or a Hugging Face ``save_to_disk`` folder, cleans and
splits them. Calibration rows come from their own file or, without one, from
train. Tokenization is ``device_agent.preprocess.TextTokenizer``: the same code
a device runs.
"""

from __future__ import annotations

from edgekit.config import DataSection
from edgekit.data import TaskData, load_dataset, read_rows, to_task_data


def load_task_data(columns: DataSection) -> TaskData:
    """Read, clean and split the build's labelled texts."""
    dataset = load_dataset(columns.path, columns.text_column, columns.label_column, columns.split_column)
    calibration = None
    if columns.calibration_path is not None:
        calibration = read_rows(columns.calibration_path, columns.text_column, columns.label_column, columns.split_column)
    return to_task_data(dataset, calibration)
