"""Tokenizer and token streams for training the demo pair (see :mod:`minedraft.demo.train`).

Kept apart from the models because it is the one step that only needs text: fitting the
byte-level BPE tokenizer on ShareGPT chat text (from :mod:`minedraft.demo.data`), wrapping
it for ``transformers`` (with the chat template the pair is trained on), and turning
documents into packed fixed-length windows of token ids. Nothing here touches a model.
"""

from __future__ import annotations

import json
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|user|>\n{{ m['content'] }}\n"
    "{% else %}<|assistant|>\n{{ m['content'] }}<|endoftext|>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def train_tokenizer(texts, vocab_size: int):
    """Byte-level BPE (``tokenizers``); special tokens get ids 0, 1, 2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from .data import SPECIAL_TOKENS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=True,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def wrap_tokenizer(tok):
    from transformers import PreTrainedTokenizerFast

    from .data import ASSISTANT_TOKEN, EOS_TOKEN, USER_TOKEN

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        additional_special_tokens=[USER_TOKEN, ASSISTANT_TOKEN],
        clean_up_tokenization_spaces=False,
        model_max_length=2048,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def portable_tokenizer_config(path: Path) -> None:
    """Make tokenizer_config.json loadable by transformers 4.x as well as 5.x.

    5.x writes ``"tokenizer_class": "TokenizersBackend"`` (unknown to 4.x) and the extra
    special tokens as a list; ``PreTrainedTokenizerFast`` + ``additional_special_tokens``
    is understood by both.
    """
    from .data import ASSISTANT_TOKEN, USER_TOKEN

    cfg_path = path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg.pop("extra_special_tokens", None)
    cfg["additional_special_tokens"] = [USER_TOKEN, ASSISTANT_TOKEN]
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def build_stream(tok, texts, eos_id: int, max_doc_tokens: int, need_tokens: int,
                 desc: str, batch: int = 256):
    """Concatenate tokenized docs (each ending in eos) until ``need_tokens`` tokens."""
    import numpy as np
    from tqdm import tqdm

    chunks: list = []
    total = 0
    pending: list[str] = []
    bar = tqdm(total=need_tokens, desc=desc, unit="tok", unit_scale=True, leave=False)

    def flush():
        nonlocal total
        for enc in tok.encode_batch(pending):
            ids = enc.ids[:max_doc_tokens]
            if not ids:
                continue
            if ids[-1] != eos_id:
                ids = ids + [eos_id]
            chunks.append(np.asarray(ids, dtype=np.int32))
            total += len(ids)
            bar.update(len(ids))
        pending.clear()

    for text in texts:
        pending.append(text)
        if len(pending) >= batch:
            flush()
            if total >= need_tokens:
                break
    if pending and total < need_tokens:
        flush()
    bar.close()
    if not chunks:
        raise RuntimeError("no training text")
    return np.concatenate(chunks), len(chunks)


def make_windows(stream, seq_len: int, seed: int):
    """``stream`` cut into ``seq_len`` windows (the tail dropped), in a seeded random order."""
    import torch

    n = len(stream) // seq_len
    w = torch.from_numpy(stream[: n * seq_len].astype("int64")).view(n, seq_len)
    g = torch.Generator().manual_seed(seed)
    return w[torch.randperm(n, generator=g)]
