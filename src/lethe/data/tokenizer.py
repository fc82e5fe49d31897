"""Tokenizers: byte-level, BPE trained on the corpus, or any pretrained fast tokenizer.

All three are `transformers.PreTrainedTokenizerFast`, so a run saves its tokenizer with
`save_pretrained(dir)` and evaluation reloads it with `load_tokenizer(dir)` (or
`AutoTokenizer.from_pretrained(dir)`) without the training config.

Tokenizer spec (the `tokenizer` config node), by kind:
  byte:       (no keys) 256 byte tokens + <|endoftext|> = 257; round-trips any UTF-8 exactly
  bpe:        vocab_size, min_frequency, max_train_documents; byte-level BPE trained on the
              training split, cached under cache_dir/tokenizers keyed by corpus + settings
  pretrained: name (Hub id or local directory), revision
"""

import logging
import os
import shutil
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from lethe.data.corpus import digest
from lethe.errors import ConfigError

log = logging.getLogger(__name__)

EOS = "<|endoftext|>"
KEYS = {"byte": set(), "bpe": {"vocab_size", "min_frequency", "max_train_documents"}, "pretrained": {"name", "revision"}}


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
    kind = spec.get("kind")
    if kind not in KEYS:
        raise ConfigError(f"tokenizer.kind={kind!r}; choose one of {', '.join(KEYS)}")
    unknown = set(spec) - KEYS[kind] - {"kind"}
    if unknown:
        raise ConfigError(f"tokenizer has unknown key(s) {sorted(unknown)} for kind={kind}; allowed: {sorted(KEYS[kind])}")
    if kind == "byte":
        return byte_tokenizer()
    if kind == "pretrained":
        return _pretrained(spec)
    return _cached_bpe(spec, Path(cache_dir), corpus)


def _pretrained(spec) -> PreTrainedTokenizerFast:
    name = spec.get("name")
    if not name:
        raise ConfigError("tokenizer.name is empty; give a Hub id (EleutherAI/gpt-neox-20b) or a directory with tokenizer.json")
    try:
        tok = AutoTokenizer.from_pretrained(str(name), revision=spec.get("revision"))
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ConfigError(
            f"cannot load tokenizer '{name}' ({first}); a Hub id needs network access or a local copy: "
            "give a directory with tokenizer.json (tokenizer.name=/path/to/dir) or pre-download it and set HF_HOME"
        ) from None
    if not isinstance(tok, PreTrainedTokenizerFast):
        raise ConfigError(f"tokenizer '{name}' has no fast (tokenizers-library) version; choose one with a tokenizer.json")
    if tok.eos_token_id is None:
        raise ConfigError(f"tokenizer '{name}' defines no eos token to separate documents; choose a tokenizer that has one")
    return tok


def _cached_bpe(spec, cache_dir: Path, corpus) -> PreTrainedTokenizerFast:
    settings = {"vocab_size": int(spec.get("vocab_size", 8192)), "min_frequency": int(spec.get("min_frequency", 2)),
                "max_train_documents": spec.get("max_train_documents")}
    path = cache_dir / "tokenizers" / f"bpe-{settings['vocab_size']}-{digest(corpus.fingerprint, settings, size=8)}"
    if (path / "tokenizer.json").is_file():
        log.info("reusing BPE tokenizer %s", path)
        return load_tokenizer(path)
    train = corpus.load()["train"]
    n = len(train) if settings["max_train_documents"] is None else min(len(train), settings["max_train_documents"])
    log.info("training byte-level BPE (vocab %d) on %d training documents of %s", settings["vocab_size"], n, corpus.name)
    batches = (train[i : min(i + 1000, n)]["text"] for i in range(0, n, 1000))
    tok = train_bpe(batches, settings["vocab_size"], settings["min_frequency"], length=n)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tok.save_pretrained(str(tmp))
    try:
        os.replace(tmp, path)  # atomic: a crash leaves no half-written tokenizer directory
    except OSError:  # another process finished first; keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
    return load_tokenizer(path)
