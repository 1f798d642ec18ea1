"""Transformers on text, on 2 CPU ranks: a GPT-2-config language model trained on
the docstrings of Python's standard library, and a BERT-config classifier (and a
Keras model of the user's with the tensorflow backend) on a generated text set;
export with save_pretrained, predict, generate."""
import csv
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest

from benchmarks.docstrings import write
from tests.conftest import require_module

pytestmark = pytest.mark.distributed

TOPICS = {
    "weather": "rain sunny cloud storm wind snow forecast humid thunder breeze".split(),
    "sport": "goal match team score player coach league referee stadium tournament".split(),
    "food": "bread cheese recipe oven spicy salad soup dessert flavour kitchen".split(),
    "music": "guitar melody concert singer chorus album rhythm drum piano lyrics".split(),
}
FILLER = "the a of and to in it was very today we they saw about with for after before really quite".split()


def topic_texts(n: int, seed: int) -> list[dict]:
    """Sentences of filler words and about a quarter topic words, at least two (a
    twentieth another topic's), labelled by their topic."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(sorted(TOPICS))
        words = []
        for _ in range(rng.randint(6, 20)):
            r = rng.random()
            words.append(rng.choice(TOPICS[label]) if r < 0.25 else
                         rng.choice(TOPICS[rng.choice(sorted(TOPICS))]) if r < 0.30 else rng.choice(FILLER))
        while sum(w in TOPICS[label] for w in words) < 2:  # a topic word or two more: each text has an answer
            words.insert(rng.randint(0, len(words)), rng.choice(TOPICS[label]))
        rows.append({"text": " ".join(words).capitalize() + ".", "label": label})
    return rows


def write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_gpt2_language_model_on_the_standard_librarys_docstrings(tmp_path, cli, figure):
    require_module("transformers")
    texts = write(tmp_path / "docs.jsonl")
    run = tmp_path / "lm"
    (tmp_path / "lm.yaml").write_text(f"""
name: docstrings-gpt2
backend: torch
task: language_modeling
data:
  source: text
  path: {tmp_path / 'docs.jsonl'}
  validation_fraction: 0.1
  tokenizer: {{vocab_size: 2000, max_length: 64}}
model:
  kind: custom
  builder: transformers:AutoModelForCausalLM.from_config
  args: {{model_type: gpt2, n_layer: 2, n_embd: 128, n_head: 4, n_positions: 64}}
optimizer: {{name: "torch.optim:AdamW", lr: 0.005, args: {{weight_decay: 0.01}}, warmup_epochs: 0.5, schedule: cosine}}
train: {{epochs: 6, batch_size: 16}}
resources: {{workers: 2, cpus_per_worker: 1}}
log: {{every_seconds: 2}}
output: {run}
""")
    result = cli("run", tmp_path / "lm.yaml", timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert re.search(r"step \d+/\d+  loss [\d.]+  \d+ tokens/s", result.stdout), result.stdout[-2000:]
    records = metrics(run)
    assert [r["epoch"] for r in records] == [1, 2, 3, 4, 5, 6]
    for r in records:
        assert r["val_perplexity"] == pytest.approx(np.exp(r["val_loss"]))
        assert r["train_tokens_per_s"] == pytest.approx(r["train_samples_per_s"] * 64)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["parameters"] > 600_000

    # the unigram baseline: each token's frequency in the whole text (the validation part
    # included, which favours the baseline), from the exported tokenizer as transformers loads it
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(run / "model" / "hf")
    ids = [t for text in texts for t in (*tokenizer(text)["input_ids"], tokenizer.eos_token_id)]
    counts = np.bincount(ids).astype(np.float64)
    seen = counts[counts > 0]
    unigram = float(np.exp(-(seen * np.log(seen / seen.sum())).sum() / seen.sum()))
    final = records[-1]["val_perplexity"]
    figure(f"GPT-2 config ({summary['parameters']:,} parameters), stdlib docstrings, 2 CPU ranks, 6 epochs: validation "
           f"perplexity {final:.1f} (unigram {unigram:.1f}), next-token accuracy "
           f"{records[-1]['val_token_accuracy']:.3f}, {records[-1]['train_tokens_per_s']:.0f} tokens/s")
    assert final < 0.5 * unigram, (final, unigram)
    assert records[-1]["val_token_accuracy"] > 0.1

    # the export is transformers' own: it loads without hvdtrain and scores the text as training did
    model = AutoModelForCausalLM.from_pretrained(run / "model" / "hf")
    import torch
    block = torch.tensor(ids[:64 * 16]).reshape(16, 64)
    with torch.no_grad():
        loss = float(model(input_ids=block, labels=block).loss)
    assert loss < np.log(unigram), (loss, np.log(unigram))

    # greedy continuation, up to the end of a text: words of the docstrings, ended as they end
    result = cli("generate", run, "Return the", "--tokens", "40")
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout.strip()
    added = out.removeprefix("Return the").split()
    vocabulary = {w for text in texts for w in text.split()}
    known = sum(w in vocabulary for w in added) / max(len(added), 1)
    figure(f"generated: {out[:200]!r}; {known:.2f} of its words are the docstrings' words")
    assert out.startswith("Return the") and added and known >= 0.8, out
    assert out.endswith(".") or len(tokenizer(out)["input_ids"]) >= 40, out


def test_bert_classifier_on_generated_texts_then_predict(tmp_path, cli, figure):
    require_module("transformers")
    write_csv(tmp_path / "topics.csv", topic_texts(2000, seed=0))
    run = tmp_path / "cls"
    (tmp_path / "cls.yaml").write_text(f"""
name: topics-bert
backend: torch
task: sequence_classification
data:
  source: text
  path: {tmp_path / 'topics.csv'}
  tokenizer: {{kind: wordpiece, vocab_size: 200, lowercase: true, max_length: 32}}
model:
  kind: custom
  builder: transformers:AutoModelForSequenceClassification.from_config
  args: {{model_type: bert, hidden_size: 64, num_hidden_layers: 2, num_attention_heads: 2, intermediate_size: 128,
          max_position_embeddings: 64}}
optimizer: {{name: adam, lr: 0.001}}
train: {{epochs: 8, batch_size: 32}}
resources: {{workers: 2}}
output: {run}
""")
    # the tokenizer is trained by one process of the node, in a cache of the test's own
    env = {"HVDTRAIN_CACHE": str(tmp_path / "cache")}
    result = cli("run", tmp_path / "cls.yaml", env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    accuracy = metrics(run)[-1]["val_accuracy"]
    assert accuracy >= 0.95, metrics(run)[-1]
    assert len(list((tmp_path / "cache" / "tokenizers").glob("*.json"))) == 1

    fresh = topic_texts(200, seed=1)
    write_csv(tmp_path / "new.csv", [{"text": r["text"]} for r in fresh])
    result = cli("predict", run, tmp_path / "new.csv", "-o", tmp_path / "predictions.csv")
    assert result.returncode == 0, result.stderr[-2000:]
    with open(tmp_path / "predictions.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["text"] for r in rows] == [r["text"] for r in fresh]
    right = np.mean([r["prediction"] == f["label"] for r, f in zip(rows, fresh)])
    figure(f"BERT config, generated topic texts, 2 CPU ranks: validation accuracy {accuracy:.3f}, "
           f"predict on 200 new texts {right:.3f}")
    assert right >= 0.95

    # evaluate: the same texts with their labels
    write_csv(tmp_path / "labelled.csv", fresh)
    result = cli("evaluate", run, tmp_path / "labelled.csv", "-o", tmp_path / "evaluation")
    assert result.returncode == 0, result.stderr[-2000:]
    evaluation = json.loads((tmp_path / "evaluation" / "evaluation.json").read_text())
    assert evaluation["samples"] == 200 and evaluation["accuracy"] == pytest.approx(right)

    # transformers alone, from the exported directory, gives the same classes
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(run / "model" / "hf")
    model = AutoModelForSequenceClassification.from_pretrained(run / "model" / "hf").eval()
    classes = sorted(TOPICS)
    for row in rows[:20]:
        ids = [tokenizer.convert_tokens_to_ids("[CLS]"), *tokenizer(row["text"], add_special_tokens=False)["input_ids"]]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids[:32]])).logits[0]
        assert classes[int(logits.argmax())] == row["prediction"]


def test_keras_model_of_the_users_on_token_ids(tmp_path, cli):
    """The tensorflow backend trains a Keras model of the user's on the same token ids."""
    write_csv(tmp_path / "topics.csv", topic_texts(1500, seed=0))
    (tmp_path / "text_models.py").write_text("""
import keras

def bag_of_embeddings(num_classes, vocab=300):
    return keras.Sequential([keras.layers.Embedding(vocab, 32, mask_zero=True),
                             keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(num_classes)])
""")
    (tmp_path / "tf.yaml").write_text(f"""
name: topics-keras
backend: tensorflow
task: classification
data: {{source: text, path: {tmp_path / 'topics.csv'}, tokenizer: {{vocab_size: 300, max_length: 32,
        padding: max_length}}}}
model: {{kind: custom, builder: "text_models:bag_of_embeddings"}}
optimizer: {{name: adam, lr: 0.01}}
train: {{epochs: 6, batch_size: 32}}
resources: {{workers: 2}}
output: {tmp_path / 'run'}
""")
    result = cli("run", tmp_path / "tf.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert metrics(tmp_path / "run")[-1]["val_accuracy"] >= 0.9, metrics(tmp_path / "run")[-1]
