"""data_prep: corpus files -> tokenizer + webdataset shards + manifest.json (a megagpt dataset dir)."""

from data_prep.prep import PrepSettings, prepare
from data_prep.shakespeare import prepare_shakespeare

__all__ = ["PrepSettings", "prepare", "prepare_shakespeare"]
