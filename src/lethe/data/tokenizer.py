"""Tokenizers: byte-level, BPE trained on the corpus, or any pretrained fast tokenizer.

All three are `transformers.PreTrainedTokenizerFast`, so a run saves its tokenizer with
`save_pretrained(dir)` and evaluation reloads it with `load_tokenizer(dir)` (or
`AutoTokenizer.from_pretrained(dir)`) without the training config.

The `tokenizer` config node names one of the builders below and its settings; the data module
calls it with the cache directory and the corpus (`build_tokenizer`):
  byte_level:  (no settings) 256 byte tokens + <|endoftext|> = 257; round-trips any UTF-8 exactly
  trained_bpe: vocab_size, min_frequency, max_train_documents; byte-level BPE trained on the
               training split, cached under cache_dir/tokenizers keyed by corpus + settings
  pretrained:  name (Hub id or local directory), revision
"""

import logging
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from lethe.config import as_target_spec, instantiate
from lethe.data.fingerprint import digest
from lethe.errors import ConfigError, first_line
from lethe.files import atomic_directory

log = logging.getLogger(__name__)

EOS = "<|endoftext|>"
# `tokenizer.kind: ...`, the form checkpoints written before tokenizers became `_target_`s carry
LEGACY_KINDS = {"byte": "lethe.data.tokenizer.byte_level", "bpe": "lethe.data.tokenizer.trained_bpe",
                "pretrained": "lethe.data.tokenizer.pretrained"}


def bytes_to_unicode() -> dict:
    """GPT-2's reversible byte -> printable character map, which ByteLevel pre-tokenizers use."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def token_byte_lengths(tok: PreTrainedTokenizerFast):
    """UTF-8 bytes of text each token id stands for (special tokens: 0), for bits per byte.
    Exact for byte-level tokenizers (Lethe's byte and BPE, GPT-2/NeoX), whose token strings are
    bytes in GPT-2's printable map; otherwise each token's own decoding (SentencePiece "▁" = one
    space, "<0xNN>" byte fallback = one byte)."""
    import json

    import numpy as np

    byte_level = '"ByteLevel"' in json.dumps(json.loads(tok.backend_tokenizer.to_str()).get("decoder"))
    special = set(tok.all_special_ids)
    lengths = np.zeros(len(tok), dtype=np.int64)
    for token, i in tok.get_vocab().items():
        if i in special or i >= len(lengths):
            continue
        if byte_level:  # one printable character per byte
            lengths[i] = len(token)
        elif token.startswith("<0x") and token.endswith(">"):
            lengths[i] = 1
        else:
            lengths[i] = len(token.replace("\u2581", " ").encode())
    return lengths


def _wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Token id = byte value; a BPE model with the 256 byte symbols and no merges, so the standard
    ByteLevel pre-tokenizer/decoder map bytes <-> ids exactly. <|endoftext|> is id 256."""
    vocab = {char: byte for byte, char in bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)  # no merges: no need to split words
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS])
    return _wrap(tok)


def train_bpe(texts, vocab_size: int, min_frequency: int = 2, length=None) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style pre-tokenization) trained on an iterable of strings."""
    if vocab_size < 257:
        raise ConfigError(f"tokenizer.vocab_size={vocab_size} is below 257 (256 bytes + {EOS}); raise it (e.g. 8192)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=True,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    return _wrap(tok)


def load_tokenizer(path) -> PreTrainedTokenizerFast:
    """Reload a tokenizer saved with save_pretrained (e.g. from a run's checkpoint directory)."""
    if not (Path(path) / "tokenizer.json").is_file():
        raise ConfigError(f"{path} holds no saved tokenizer (tokenizer.json); point at a run's tokenizer directory")
    return PreTrainedTokenizerFast.from_pretrained(str(path))


def tokenizer_fingerprint(tok: PreTrainedTokenizerFast) -> str:
    """Identity by content: vocabulary, merges, normalization, pre-tokenization, special tokens."""
    return digest(tok.backend_tokenizer.to_str(), tok.eos_token_id, size=8)


def document_encoder(tok: PreTrainedTokenizerFast) -> Tokenizer:
    """The raw `tokenizers.Tokenizer` used to encode corpus documents: text that happens to contain
    "<|endoftext|>" stays text (only packing inserts separators), no truncation or padding."""
    enc = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    enc.encode_special_tokens = True
    enc.no_truncation()
    enc.no_padding()
    return enc


def build_tokenizer(spec: dict, cache_dir, corpus=None) -> PreTrainedTokenizerFast:
    """The tokenizer a `tokenizer` spec names (its settings checked by name)."""
    spec = as_target_spec(spec, LEGACY_KINDS, "tokenizer")
    if "_target_" not in spec:
        raise ConfigError("tokenizer has no _target_; choose a tokenizer group (tokenizer=byte, bpe or gpt-neox)")
    return instantiate(spec, config_key="tokenizer", _partial_=True, _convert_="all")(cache_dir, corpus)


def byte_level(cache_dir=None, corpus=None, /) -> PreTrainedTokenizerFast:
    """tokenizer=byte: nothing to train or download."""
    return byte_tokenizer()


def pretrained(cache_dir=None, corpus=None, /, *, name: str, revision: str | None = None) -> PreTrainedTokenizerFast:
    """tokenizer=gpt-neox (or any AutoTokenizer): a Hub id or a local directory with tokenizer.json."""
    if not name:
        raise ConfigError("tokenizer.name is empty; give a Hub id (EleutherAI/gpt-neox-20b) or a directory with tokenizer.json")
    try:
        tok = AutoTokenizer.from_pretrained(str(name), revision=revision)
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"cannot load tokenizer '{name}' ({first_line(e, 200)}); a Hub id needs network access or a local copy: "
            "give a directory with tokenizer.json (tokenizer.name=/path/to/dir) or pre-download it and set HF_HOME"
        ) from None
    if not isinstance(tok, PreTrainedTokenizerFast):
        raise ConfigError(f"tokenizer '{name}' has no fast (tokenizers-library) version; choose one with a tokenizer.json")
    if tok.eos_token_id is None:
        raise ConfigError(f"tokenizer '{name}' defines no eos token to separate documents; choose a tokenizer that has one")
    return tok


def trained_bpe(cache_dir, corpus, /, *, vocab_size: int = 8192, min_frequency: int = 2,
                max_train_documents: int | None = None) -> PreTrainedTokenizerFast:
    """tokenizer=bpe: byte-level BPE trained on the corpus's training split once, then reused."""
    if corpus is None:
        raise ConfigError("tokenizer=bpe is trained on a corpus, and this data has none (synthetic tasks); use tokenizer=byte")
    settings = {"vocab_size": int(vocab_size), "min_frequency": int(min_frequency), "max_train_documents": max_train_documents}
    path = Path(cache_dir) / "tokenizers" / f"bpe-{settings['vocab_size']}-{digest(corpus.fingerprint, settings, size=8)}"
    if (path / "tokenizer.json").is_file():
        log.info("reusing BPE tokenizer %s", path)
        return load_tokenizer(path)
    train = corpus.load()["train"]
    n = len(train) if max_train_documents is None else min(len(train), max_train_documents)
    log.info("training byte-level BPE (vocab %d) on %d training documents of %s", settings["vocab_size"], n, corpus.name)
    batches = (train[i : min(i + 1000, n)]["text"] for i in range(0, n, 1000))
    tok = train_bpe(batches, settings["vocab_size"], settings["min_frequency"], length=n)
    with atomic_directory(path, marker="tokenizer.json") as tmp:  # never a half-written tokenizer directory
        tok.save_pretrained(str(tmp))
    return load_tokenizer(path)
