"""Corpus to text: a gzipped jsonl corpus → sentencepiece dataset → a tiny model trains → decoded samples."""

import gzip
import json
import math

from helpers import CPU_CONFIG, TINY_MODEL, train_records

from data_prep.cli import main as prep_main
from megagpt.config import load_config
from megagpt.dataset import load_tokenizer
from megagpt.sample import sample_texts
from megagpt.train import train


def test_sentencepiece_jsonl_corpus_trains_and_samples(shakespeare_path, tmp_path):
    speeches = shakespeare_path.read_text()[:300_000].split("\n\n")
    corpus = tmp_path / "plays.jsonl.gz"
    with gzip.open(corpus, "wt") as f:
        for speech in speeches:
            f.write(json.dumps({"body": speech}) + "\n")
    data = tmp_path / "sp"
    assert (
        prep_main(
            [
                "sentencepiece",
                "--input",
                str(corpus),
                "--out",
                str(data),
                "--vocab-size",
                "512",
                "--text-field",
                "body",
                "--workers",
                "2",
                "--shard-size-mb",
                "0.05",
                "--sample-tokens",
                "10000",
            ]
        )
        == 0
    )
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["vocab_size"] == 512 and manifest["splits"]["train"]["shards"] > 1

    run = tmp_path / "run"
    cfg = load_config(
        CPU_CONFIG,
        [
            *(f"model.{k}={v}" for k, v in TINY_MODEL.items()),
            f"data.dataset_dir={data}",
            "train.max_steps=30",
            "train.micro_batch_size=8",
            "train.lr=3e-3",
            "train.warmup_steps=3",
            "train.eval_interval=30",
            "train.eval_steps=2",
            "train.sample_tokens=10",
            "train.log_interval=1",
            "logging.progress_bar=false",
        ],
    )
    train(cfg, run)
    losses = [r["loss"] for r in train_records(run)]
    assert losses[0] > math.log(512) - 0.5 and losses[-1] < losses[0] - 1.0

    texts = sample_texts(run, "KING RICHARD:", 20, num_samples=2, seed=5)
    tok = load_tokenizer(run / "tokenizer")
    assert tok.kind == "sentencepiece"
    for text in texts:
        assert text.startswith("KING RICHARD:") and len(tok.encode(text)) >= len(tok.encode("KING RICHARD:")) + 10
