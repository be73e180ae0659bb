"""Scores written back into the user's own dataset, losslessly (issue 24, items 3 and 4).

- ``to_shards``: the kept samples of webdataset tar shards, every member copied byte for byte, keys
  unchanged, plus ``<key>.perceptscore.json`` with the row's scores, into new shards ``00000.tar ...``.
- ``to_parquet``: the kept rows of parquet / arrow datasets with all their columns (image bytes untouched)
  plus the score columns, in the hub layout ``data/train-NNNNN-of-NNNNN.parquet``.

Both read each source once, in the order the rows first name it, and write into a folder that is new or
empty (never over anything). A kept row that can't be written becomes one line in ``missing``.
"""

from __future__ import annotations

from perceptscore.writeback._common import WrittenBack
from perceptscore.writeback.parquet import to_parquet
from perceptscore.writeback.shards import to_shards

__all__ = ["WrittenBack", "to_parquet", "to_shards"]
