"""Text data (data.source text): reading, tokenisers trained once and cached, token
batches, language-modelling blocks, the spec's rules and bad input named."""
import json

import numpy as np
import pytest

from hvdtrain.data import load_dataset
from hvdtrain.errors import DataError, SpecError, UserError
from hvdtrain.spec import DataSpec, validate
from tests.conftest import require_module

require_module("tokenizers")

STORY = ["The quick brown fox jumps over the lazy dog near the river bank.",
         "A slow green turtle walks under the busy bridge by the old mill.",
         "Every morning the baker opens the shop and sells warm bread to the town."]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HVDTRAIN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def text_spec(path, **keys):
    return DataSpec(source="text", path=path, **keys)


def test_language_modelling_blocks_split_by_text_and_the_tokenizer_trained_once(tmp_path, cache):
    texts = [f"{STORY[i % 3]} Line {i} of the story." for i in range(300)]
    path = jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in texts])
    spec = text_spec(path, validation_fraction=0.2, tokenizer={"vocab_size": 300, "max_length": 16})
    data = load_dataset(spec, task="language_modeling")
    prep = data.preprocessing
    x, y = data.train.batch(np.arange(4))
    assert x.shape == (4, 16) and x.dtype == np.int64 and (x == y).all()
    assert prep.outputs == prep.vocab_size <= 300 and prep.task == "language_modeling"
    # the stream: every text ends with the end token, so blocks hold about one per text
    train_ends = int((data.train.x == prep.end_id).sum())
    assert 0.7 * 240 <= train_ends <= 240
    # the tokenizer was trained once, cached, and loaded again by a second reader (another rank)
    files = list((cache / "tokenizers").glob("*.json"))
    assert len(files) == 1
    stamp = files[0].stat().st_mtime_ns
    again = load_dataset(spec, task="language_modeling")
    assert again.fingerprint == data.fingerprint and files[0].stat().st_mtime_ns == stamp
    assert (again.val.x == data.val.x).all()
    # another vocabulary: another tokenizer
    other = load_dataset(text_spec(path, tokenizer={"vocab_size": 400, "max_length": 16}), task="language_modeling")
    assert other.fingerprint != data.fingerprint


def test_classification_batches_padded_to_their_longest_or_to_max_length(tmp_path):
    rows = [{"text": ("word " * (1 + i % 9)) + STORY[i % 3], "label": ["a", "b", "c"][i % 3]} for i in range(90)]
    path = jsonl(tmp_path / "t.jsonl", rows)
    data = load_dataset(text_spec(path, tokenizer={"kind": "wordpiece", "vocab_size": 200, "max_length": 40}))
    prep = data.preprocessing
    assert prep.classes == ["a", "b", "c"] and prep.pad_id == 0 and prep.start_id == 2
    x, y = data.train.batch(np.arange(len(data.train)))
    assert x.shape[1] < 40 and (x[:, 0] == prep.start_id).all()
    lengths = (x != prep.pad_id).sum(axis=1)
    assert lengths.max() == x.shape[1] and lengths.min() < x.shape[1]  # padded to the longest
    assert (x[np.arange(len(x)), lengths - 1] != prep.pad_id).all()  # padding only at the end
    two, _ = data.train.batch(np.array([0, 1]))
    assert two.shape[1] == max((data.train.batch(np.array([i]))[0] != 0).sum() for i in (0, 1))
    fixed = load_dataset(text_spec(path, tokenizer={"vocab_size": 200, "max_length": 40, "padding": "max_length"}))
    assert fixed.train.batch(np.array([0]))[0].shape == (1, 40)
    cut = load_dataset(text_spec(path, tokenizer={"vocab_size": 200, "max_length": 8}))
    assert ((cut.train.batch(np.arange(len(cut.train)))[0] != 0).sum(axis=1) == 8).all()  # each text cut to 8


@pytest.mark.parametrize("case, message", [
    ("no column", "data.text_column: "),
    ("empty text", ":3: empty text in column 'text'"),
    ("bad tokenizer", "data.tokenizer.file: "),
    ("plain text, labels wanted", "is plain text, without labels"),
    ("too little text", "fewer than data.tokenizer.max_length"),
])
def test_bad_text_input_is_named(tmp_path, case, message):
    keys = {}
    task = "classification"
    if case == "no column":
        path = jsonl(tmp_path / "t.jsonl", [{"body": "x", "label": "a"}])
    elif case == "empty text":
        path = tmp_path / "t.csv"
        path.write_text('text,label\n"fine words",a\n"  ",b\n')
    elif case == "bad tokenizer":
        path = jsonl(tmp_path / "t.jsonl", [{"text": "x", "label": "a"}, {"text": "y", "label": "b"}])
        (tmp_path / "tok.json").write_text('{"not": "a tokenizer"}')
        keys["tokenizer"] = {"file": tmp_path / "tok.json"}
    elif case == "plain text, labels wanted":
        path = tmp_path / "t.txt"
        path.write_text("one paragraph\n\nanother")
    else:
        path = tmp_path / "t.txt"
        path.write_text("\n\n".join(["tiny"] * 20))
        task, keys["tokenizer"] = "language_modeling", {"vocab_size": 100, "max_length": 512}
    with pytest.raises(DataError, match=".*" + message.replace("(", r"\(").replace(".", r"\.")):
        load_dataset(text_spec(path, **keys), task=task)


def spec_problems(**changes) -> str:
    raw = {"name": "t", "backend": "torch", "task": "language_modeling",
           "data": {"source": "text", "path": "docs.jsonl"},
           "model": {"kind": "custom", "builder": "transformers:AutoModelForCausalLM.from_config",
                     "args": {"model_type": "gpt2"}}}
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            raw[section][field] = value
        else:
            raw[section] = value
    try:
        spec = validate(raw)
    except SpecError as err:
        return str(err)
    return f"valid: task {spec.task}"


def test_the_specs_text_rules():
    assert spec_problems() == "valid: task language_modeling"
    assert spec_problems(task="sequence_classification",
                         model__builder="transformers:AutoModelForSequenceClassification.from_config") == \
        "valid: task classification"
    assert "task language_modeling trains on text" in spec_problems(data={"source": "digits"})
    assert "Hugging Face models train with backend torch" in spec_problems(backend="tensorflow")
    assert "backend torch only" in spec_problems(backend="tensorflow", model={"kind": "custom", "builder": "m:f"})
    assert "model.kind custom" in spec_problems(model={"kind": "mlp"})
    assert "source 'text' reads .csv, .jsonl, .parquet, .txt" in spec_problems(data__path="docs.pdf")
    assert "data.tokenizer applies to source 'text'" in spec_problems(
        task="classification", data={"source": "digits", "tokenizer": {}}, model={"kind": "mlp"})
    assert "vocab_size describes a tokenizer trained here" in spec_problems(
        data__tokenizer={"file": "tok.json", "vocab_size": 100})


def test_sequences_longer_than_the_models_positions_are_refused(tmp_path):
    require_module("transformers")
    from hvdtrain.backends.text_models import hf_config
    texts = [f"{STORY[i % 3]} number {i}" for i in range(60)]
    data = load_dataset(text_spec(jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts]),
                                  tokenizer={"vocab_size": 200, "max_length": 128}), task="language_modeling")
    with pytest.raises(UserError, match=r"data.tokenizer.max_length 128 is longer than the model's positions "
                                        r"\(model.args.n_positions: 64\)"):
        hf_config({"model_type": "gpt2", "n_positions": 64}, data.preprocessing)
    config = hf_config({"model_type": "gpt2", "n_positions": 128, "n_layer": 1}, data.preprocessing)
    assert config.vocab_size == data.preprocessing.vocab_size and config.pad_token_id == 0
    with pytest.raises(UserError, match="model.args: give the model's config"):
        hf_config({"n_layer": 1}, data.preprocessing)
