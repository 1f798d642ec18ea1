"""Text (`data.source: text`): texts from a .csv, .jsonl or .parquet column
(`data.text_column`; with `data.label_column` for classification) or a .txt file's
paragraphs, made token ids with a Hugging Face `tokenizers` tokenizer: a
tokenizer.json of the user's, or one trained on the training split's texts (one
process per node trains it under a lock, the others load it; cached by the texts'
digest and the settings), saved with the model.

Classification: each text is [CLS] and its tokens, cut to `max_length`, and a
batch is padded to its longest (or to max_length) with the padding token; the
model's attention mask is `ids != pad` (`TextModel`). Language modelling: each
split's texts, each ended by the end token, are one stream cut into blocks of
max_length tokens (the remainder dropped): a sample is a block and its own
target (the loss takes each position's next token). The split is by text, so
that validation scores texts never trained on.
"""
from __future__ import annotations

import csv
import fcntl
import hashlib
import json
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..horovod_build.build import cache_root
from ..spec import DataSpec, TokenizerSpec
from .split import Targets, random_split
from .types import ArraySamples, Dataset, Preprocessing

# The trained tokenizer's special tokens, in id order: padding first (id 0)
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[EOS]"]
# A given tokenizer's special tokens, found by the names the common ones use
PAD_NAMES = ("[PAD]", "<pad>", "<|padding|>")
END_NAMES = ("[EOS]", "</s>", "<|endoftext|>", "<eos>", "[SEP]")
START_NAMES = ("[CLS]", "<s>", "<|startoftext|>", "<bos>")


def read_texts(spec: DataSpec, task: str) -> tuple[list[str], list[str] | None]:
    """The texts of data.path and, for classification, their labels (as text)."""
    path, column, label = Path(spec.path), spec.text_column, spec.label_column
    suffix = path.suffix.lower()
    if suffix == ".txt":
        if task != "language_modeling":
            raise DataError(f"data.path: {path} is plain text, without labels: task language_modeling, or a "
                            ".csv, .jsonl or .parquet file with a label column")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise DataError(f"data.path: cannot read {path} as UTF-8 text ({err})") from None
        texts = [p.strip() for p in text.replace("\r\n", "\n").split("\n\n") if p.strip()]
        if not texts:
            raise DataError(f"data.path: {path} holds no text")
        return texts, None
    rows = table_rows(path, suffix)
    if not rows:
        raise DataError(f"data.path: {path} has no rows")
    where, first = rows[0]
    want = [column] + ([label] if task == "classification" else [])
    for key, name in zip(("data.text_column", "data.label_column"), want):
        if name not in first:
            raise DataError(f"{key}: {path} has no column {name!r} (columns: {', '.join(map(str, first))})")
    texts, labels = [], []
    for where, row in rows:
        value = row.get(column)
        if not isinstance(value, str):
            raise DataError(f"{path}:{where}: {column!r} holds {type(value).__name__}, not text")
        if not value.strip():
            raise DataError(f"{path}:{where}: empty text in column {column!r}")
        texts.append(value)
        if task == "classification":
            labels.append("" if row.get(label) is None else str(row[label]).strip())
    return texts, labels if task == "classification" else None


def table_rows(path: Path, suffix: str) -> list[tuple[str, dict]]:
    """(where, row as a dict) of each row: a CSV or JSON lines file's line, a Parquet row's number."""
    if suffix == ".csv":
        try:
            with open(path, newline="", encoding="utf-8") as handle:
                reader = csv.DictReader(handle)
                return [(str(reader.line_num), row) for row in reader if any((v or "").strip() for v in row.values())]
        except (UnicodeDecodeError, OSError, csv.Error) as err:
            raise DataError(f"data.path: cannot read {path} as UTF-8 CSV ({err})") from None
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
            table = pq.read_table(path)
        except ImportError:
            raise DataError("data.path: reading Parquet needs pyarrow: pip install 'hvdtrain[parquet]'") from None
        except Exception as err:  # noqa: BLE001 -- pyarrow raises several kinds
            raise DataError(f"data.path: {path} is not a readable Parquet file ({err})") from None
        return [(f"row {i + 1}", row) for i, row in enumerate(table.to_pylist())]
    rows = []
    try:
        with open(path, encoding="utf-8") as handle:
            for line, text in enumerate(handle, start=1):
                if not text.strip():
                    continue
                row = json.loads(text)
                if not isinstance(row, dict):
                    raise DataError(f"{path}:{line}: a JSON object per line expected, got {type(row).__name__}")
                rows.append((str(line), row))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{line}: not JSON ({err.msg})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"data.path: cannot read {path} as UTF-8 JSON lines ({err})") from None
    return rows


def tokenizer_for(spec: TokenizerSpec, texts: list[str]):
    """The spec's tokenizer: its file, or one trained on texts (cached, see the module)."""
    from tokenizers import Tokenizer
    if spec.file is not None:
        try:
            return Tokenizer.from_file(str(spec.file))
        except Exception as err:  # noqa: BLE001 -- tokenizers raises its own kinds
            raise DataError(f"data.tokenizer.file: {spec.file} does not load as a tokenizers tokenizer "
                            f"({str(err).splitlines()[0][:200]})") from None
    digest = hashlib.sha256(json.dumps([spec.kind, spec.vocab_size, spec.lowercase]).encode())
    for text in texts:
        digest.update(hashlib.sha256(text.encode()).digest())
    path = cache_root() / "tokenizers" / f"{digest.hexdigest()[:24]}.json"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.with_suffix(".lock"), "a")
    except OSError:  # a cache that cannot be written: train here (deterministic for bpe)
        return trained(spec, texts)
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one process per node trains; the others wait and load
        if path.is_file():
            return Tokenizer.from_file(str(path))
        tokenizer = trained(spec, texts)
        partial = path.with_suffix(".partial")
        tokenizer.save(str(partial))
        partial.replace(path)
        return tokenizer


def trained(spec: TokenizerSpec, texts: list[str]):
    """A BPE (byte-level) or WordPiece tokenizer trained on texts."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    if spec.kind == "bpe":
        tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=spec.vocab_size, special_tokens=SPECIAL, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:
        tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tokenizer.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=spec.vocab_size, special_tokens=SPECIAL,
                                            show_progress=False)
    if spec.lowercase:
        tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def special_ids(tokenizer) -> dict[str, int | None]:
    """pad, end and start tokens' ids: the first of each's usual names the tokenizer has;
    without a padding token, the end token pads (a language model's blocks need none)."""
    vocab = tokenizer.get_vocab()
    find = lambda names: next((vocab[n] for n in names if n in vocab), None)  # noqa: E731
    pad, end, start = find(PAD_NAMES), find(END_NAMES), find(START_NAMES)
    if pad is None and end is None:
        raise DataError("data.tokenizer.file: the tokenizer has neither a padding token "
                        f"({', '.join(PAD_NAMES)}) nor an end token ({', '.join(END_NAMES)})")
    return {"pad": pad if pad is not None else end, "end": end if end is not None else pad, "start": start,
            "dedicated_pad": pad is not None}


class TokenSamples:
    """Texts as token ids of different lengths, padded a batch at a time."""

    def __init__(self, ids: list[list[int]], y: np.ndarray, pad: int, fixed: int | None):
        self.flat = np.asarray([t for seq in ids for t in seq], dtype=np.int32)
        self.ends = np.cumsum([len(seq) for seq in ids]).astype(np.int64)
        self.y, self.pad, self.fixed = y, pad, fixed

    def __len__(self) -> int:
        return len(self.y)

    def batch(self, indices: np.ndarray, epoch: int | None = None):
        indices = np.asarray(indices, dtype=np.int64)
        starts = np.where(indices > 0, self.ends[indices - 1], 0)
        lengths = self.ends[indices] - starts
        width = self.fixed or int(lengths.max(initial=1))
        x = np.full((len(indices), width), self.pad, dtype=np.int64)
        for row, (start, length) in enumerate(zip(starts, lengths)):
            x[row, :length] = self.flat[start:start + length]
        return x, self.y[indices]


def encode(tokenizer, texts: list[str], prep: Preprocessing) -> list[list[int]]:
    """Classification: each text's ids, [CLS] first where the tokenizer has one, cut to max_length."""
    start = [prep.start_id] if prep.start_id is not None else []
    keep = prep.max_length - len(start)
    return [start + e.ids[:keep] for e in tokenizer.encode_batch(texts, add_special_tokens=False)]


def padded(ids: list[list[int]], prep: Preprocessing) -> np.ndarray:
    """Token ids as one int64 array, padded as in training."""
    fixed = prep.max_length if prep.padding == "max_length" else None
    return TokenSamples(ids, np.zeros(len(ids)), prep.pad_id, fixed).batch(np.arange(len(ids)))[0]


def blocks(tokenizer, texts: list[str], prep: Preprocessing) -> np.ndarray:
    """Language modelling: the texts' ids, each text ended by the end token, cut into
    blocks of max_length: int64 [blocks, max_length]."""
    stream = [t for e in tokenizer.encode_batch(texts, add_special_tokens=False) for t in (*e.ids, prep.end_id)]
    n = len(stream) // prep.max_length
    return np.asarray(stream[:n * prep.max_length], dtype=np.int64).reshape(n, prep.max_length)


def load(spec: DataSpec, image: bool, task: str) -> Dataset:
    texts, labels = read_texts(spec, task)
    given = tokenizer_for(spec.tokenizer, []) if spec.tokenizer.file is not None else None  # named first
    if task == "classification":
        kept = np.asarray([label != "" for label in labels])
        targets = Targets.split(np.asarray(labels)[kept], task, spec)
        index = np.flatnonzero(kept)
        parts = {"train": index[targets.train], "val": index[targets.val], "test": index[targets.test]}
        classes, dropped = targets.classes, int((~kept).sum())
    else:
        rest, test = np.arange(len(texts)), np.zeros(0, dtype=np.int64)
        if spec.test_fraction:
            kept_rows, held = random_split(len(rest), spec.test_fraction, spec.seed + 1)
            rest, test = rest[kept_rows], rest[held]
        train, val = random_split(len(rest), spec.validation_fraction / (1 - spec.test_fraction), spec.seed)
        parts, classes, dropped = {"train": rest[train], "val": rest[val], "test": test}, [], 0
    tokenizer = given or tokenizer_for(spec.tokenizer, [texts[i] for i in parts["train"]])
    ids = special_ids(tokenizer)
    tokenizer_json = tokenizer.to_str()
    prep = Preprocessing([], classes, [spec.tokenizer.max_length], [], [], [], task,
                         text_column=spec.text_column, tokenizer=tokenizer_json, max_length=spec.tokenizer.max_length,
                         padding=spec.tokenizer.padding, pad_id=ids["pad"], end_id=ids["end"], start_id=ids["start"],
                         ignore_pad=ids["dedicated_pad"], vocab_size=tokenizer.get_vocab_size())
    split: dict[str, object] = {}
    for name, rows in parts.items():
        chosen = [texts[i] for i in rows]
        if task == "language_modeling":
            x = blocks(tokenizer, chosen, prep)
            if name != "test" and len(x) == 0:
                raise DataError(f"data.path: the {name} split's {len(chosen)} texts hold fewer than "
                                f"data.tokenizer.max_length ({prep.max_length}) tokens; lower max_length or "
                                "give more text")
            split[name] = ArraySamples(x, x) if len(x) else None
        else:
            y = targets.y[{"train": targets.train, "val": targets.val, "test": targets.test}[name]]
            split[name] = TokenSamples(encode(tokenizer, chosen, prep), y, prep.pad_id,
                                       prep.max_length if prep.padding == "max_length" else None) if len(rows) else None
    fingerprint = hashlib.sha256(tokenizer_json.encode()).hexdigest()
    return Dataset(split["train"], split["val"], prep, dropped, split["test"], fingerprint=fingerprint)
