"""Models on token ids (torch): Hugging Face models built from a config
(`model.builder: transformers:AutoModelForCausalLM.from_config`, the config in
`model.args`: its keys with `model_type`, or `config:` a local config.json or
directory; nothing is downloaded), run as any model through `TextModel` (token ids
in, logits out, the attention mask from the padding); the language-modelling
loss; export with `save_pretrained` and the tokenizer; greedy generation.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import plugins
from ..data import Preprocessing
from ..errors import UserError

HF_DIR = "hf"  # in an exported model's directory: save_pretrained's files and the tokenizer's


class TextModel(nn.Module):
    """A Hugging Face model (or one of yours returning an object with .logits) on token
    ids [n, length]: the logits. Classification batches are padded: the attention mask
    is where the ids are not padding. Carries the tokenizer (tokenizers' JSON) to export."""

    def __init__(self, model: nn.Module, pad_id: int, masked: bool, tokenizer: str = ""):
        super().__init__()
        self.model, self.pad_id, self.masked, self.tokenizer = model, pad_id, masked, tokenizer

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = (ids != self.pad_id).long() if self.masked else None
        out = self.model(input_ids=ids, attention_mask=mask)
        return out.logits if hasattr(out, "logits") else out


def is_hugging_face(model) -> bool:
    return type(model).__module__.split(".")[0] == "transformers" and hasattr(model, "config")


def hf_config(args: dict, prep: Preprocessing):
    """The model's config: model.args (model_type and its keys, or config: a local
    path, other keys overriding it), with the tokenizer's vocabulary and special ids and,
    for classification, the classes."""
    try:
        from transformers import AutoConfig
    except ImportError:
        raise UserError("model.builder: Hugging Face models need transformers: pip install 'hvdtrain[text]'") from None
    args = dict(args)
    try:
        if "config" in args:
            where = Path(args.pop("config"))
            if not where.exists():
                raise UserError(f"model.args.config: {where} does not exist (a config.json, or a directory holding one)")
            config = AutoConfig.from_pretrained(str(where), local_files_only=True)
            for key, value in args.items():
                setattr(config, key, value)
        elif "model_type" in args:
            config = AutoConfig.for_model(args.pop("model_type"), **args)
        else:
            raise UserError("model.args: give the model's config: model_type (gpt2, bert, llama, ...) and its keys, "
                            "or config: a local config.json")
    except (ValueError, OSError, TypeError, KeyError) as err:
        raise UserError(f"model.args: not a config transformers knows ({str(err).splitlines()[0][:200]})") from None
    config.vocab_size = prep.vocab_size
    config.pad_token_id = prep.pad_id
    config.eos_token_id = prep.end_id
    config.bos_token_id = prep.start_id if prep.start_id is not None else prep.end_id
    if prep.task == "classification":
        config.num_labels = len(prep.classes)
    for key in ("n_positions", "max_position_embeddings"):
        positions = getattr(config, key, None)
        if isinstance(positions, int) and prep.max_length > positions:
            raise UserError(f"data.tokenizer.max_length {prep.max_length} is longer than the model's positions "
                            f"(model.args.{key}: {positions}); lower max_length or raise {key}")
    return config


def build(section, prep: Preprocessing) -> nn.Module:
    """A transformers:...from_config builder's model, from model.args as its config."""
    config = hf_config(section.args, prep)
    builder = plugins.load(section.builder, "model.builder")
    try:
        model = builder(config)
    except Exception as err:
        raise UserError(f"model.builder: {section.builder} raised {type(err).__name__}: "
                        f"{str(err).splitlines()[0][:300]}") from None
    return wrapped(model, prep)


def wrapped(model: nn.Module, prep: Preprocessing) -> nn.Module:
    """A Hugging Face model as a TextModel; any other model as it is."""
    if not is_hugging_face(model):
        return model
    return TextModel(model, prep.pad_id, masked=prep.task == "classification", tokenizer=prep.tokenizer)


def next_token_loss(pad: int | None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Language modelling's cross-entropy: the logits [n, length, vocab] at each position
    against the next token of the block's ids [n, length]; padding not counted."""
    ignore = -100 if pad is None else pad

    def loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1),
                               ignore_index=ignore)
    return loss


def save(model: TextModel, directory: Path) -> dict:
    """save_pretrained's files and the tokenizer (a PreTrainedTokenizerFast:
    AutoTokenizer.from_pretrained loads it) in directory/hf; model.json's entries."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast
    from transformers.utils import logging
    target = directory / HF_DIR
    inner = model.model
    logging.disable_progress_bar()  # one bar a file on stderr, in a job's log
    inner.save_pretrained(target)
    tokenizer = Tokenizer.from_str(model.tokenizer)
    config = inner.config
    names = {key: tokenizer.id_to_token(value) for key, value in
             (("pad_token", config.pad_token_id), ("eos_token", config.eos_token_id), ("bos_token", config.bos_token_id))
             if value is not None}
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, **names).save_pretrained(target)
    return {"transformers": {"class": type(inner).__name__, "dir": HF_DIR}}


def load(directory: Path, entry: dict, prep: Preprocessing) -> nn.Module:
    """An exported Hugging Face model (model.json's entry), wrapped as in training, in eval mode."""
    import transformers
    transformers.utils.logging.disable_progress_bar()  # no bar on stderr for loading the weights
    cls = getattr(transformers, entry["class"], None)
    if cls is None:
        raise UserError(f"{directory}: this transformers has no {entry['class']} (the model's class)")
    return wrapped(cls.from_pretrained(str(directory / entry["dir"]), local_files_only=True), prep).eval()


def load_model(directory: Path, entry: dict) -> Callable[[np.ndarray], np.ndarray]:
    """An exported text model as a function from token ids to logits (CPU)."""
    model = load(directory, entry, Preprocessing.load(directory / "preprocessing.json"))

    def outputs(ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        with torch.no_grad():  # 64 texts at a time: the activations of many long texts fill memory
            return np.concatenate([model(torch.from_numpy(ids[i:i + 64])).float().numpy()
                                   for i in range(0, len(ids), 64)]) if len(ids) else np.zeros((0, 0))
    return outputs


def generate(directory: Path, prompt: str, tokens: int) -> str:
    """The prompt continued greedily by at most `tokens` tokens (the most likely each
    time), until the end token (the end of a text in training), on the CPU; the window
    the model sees is its last max_length tokens."""
    config = json.loads((directory / "model.json").read_text())
    entry = config.get("transformers")
    prep = Preprocessing.load(directory / "preprocessing.json")
    if entry is None or prep.task != "language_modeling":
        raise UserError(f"{directory}: not a language model (task {prep.task}); `hvdtrain predict` classifies")
    from tokenizers import Tokenizer
    tokenizer = Tokenizer.from_str(prep.tokenizer)
    model = load(directory, entry, prep)
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    if not ids:
        raise UserError("the prompt is empty: give some text to continue")
    made: list[int] = []
    with torch.no_grad():
        for _ in range(tokens):
            window = torch.tensor([(ids + made)[-prep.max_length:]], dtype=torch.int64)
            token = int(model(window)[0, -1].argmax())
            if token == prep.end_id:
                break
            made.append(token)
    return tokenizer.decode(ids + made)
