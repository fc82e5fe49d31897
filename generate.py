"""Sample text from a trained model, streaming tokens as they come.

    python generate.py ckpt=logs/train/runs/<run>/checkpoints/best.ckpt 'prompt="def main("'
    python generate.py ckpt=... 'prompt=["import os","class Node"]' temperature=0 max_new_tokens=50
    python generate.py --help | --cfg job
"""

import contextlib
import os
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, ListConfig

from lethe import cli  # (also registers the resolver --help uses)

ROOT = Path(__file__).resolve().parent
os.environ.setdefault("LETHE_ROOT", str(ROOT))


class TextStream:
    """Prints one row's new tokens as text as they arrive. Decodes the whole continuation each
    time and prints what is new, holding back an incomplete UTF-8 character (byte tokenizers
    emit one byte at a time)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.tokens, self.printed = tokenizer, [], ""

    def __call__(self, row: int, token: int):
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens)
        if not text.endswith("\ufffd"):
            self._print(text)

    def finish(self):
        """Print what was held back: a character the generation ended in the middle of."""
        self._print(self.tokenizer.decode(self.tokens))
        print()

    def _print(self, text):
        print(text[len(self.printed):], end="", flush=True)
        self.printed = text


def run(cfg: DictConfig):
    import torch
    from tqdm import tqdm

    from lethe.errors import ConfigError
    from lethe.generation import check_sampling, generate
    from lethe.training.checkpoint import load_trained_model

    if not cfg.ckpt:
        raise ConfigError("no checkpoint: pass ckpt=<run>/checkpoints/best.ckpt")
    check_sampling(cfg.temperature, cfg.top_k, cfg.top_p, cfg.max_new_tokens)
    if cfg.device not in ("auto", "cpu", "cuda") and not str(cfg.device).startswith("cuda:"):
        raise ConfigError(f"device={cfg.device!r}; choose auto, cpu or cuda[:N]")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={cfg.device} but no CUDA GPU is available; use device=cpu")

    model, tokenizer, _ = load_trained_model(cfg.ckpt)
    model.to(device)
    texts = list(cfg.prompt) if isinstance(cfg.prompt, ListConfig) else [str(cfg.prompt)]
    eos = tokenizer.eos_token_id
    # Training saw documents separated by eos, so a prompt is the start of a document after one.
    prompts = [[eos] + tokenizer.encode(text, add_special_tokens=False) for text in texts]

    streaming = cfg.stream and len(prompts) == 1
    if streaming:
        print(texts[0], end="", flush=True)
        on_token = TextStream(tokenizer)
    else:
        bar = tqdm(total=len(prompts) * cfg.max_new_tokens, desc="generating", unit="tok")
        on_token = lambda row, token: bar.update()  # noqa: E731
    # bf16 autocast on GPU, as in training; the decoding states keep the scan state in fp32.
    # No autocast cast cache: it is freed when the context exits, while a CUDA graph keeps
    # pointing at the casts it captured.
    cuda = device.startswith("cuda")
    autocast = torch.autocast("cuda", torch.bfloat16, cache_enabled=False) if cuda else contextlib.nullcontext()
    start = time.perf_counter()
    with autocast:
        new_tokens = generate(
            model, prompts, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p, cfg.seed,
            stop_token=eos if cfg.stop_at_eos else None, on_token=on_token, cuda_graph=cfg.cuda_graph,
        )
    seconds = time.perf_counter() - start
    if streaming:
        on_token.finish()
    else:
        bar.close()
        for i, (text, tokens) in enumerate(zip(texts, new_tokens)):
            print(f"--- [{i}] ---\n{text}{tokenizer.decode(tokens)}")
    count = sum(len(t) for t in new_tokens)
    print(f"{count} new tokens in {seconds:.2f} s ({count / seconds:.1f} tokens/s, {device})", file=sys.stderr)


@hydra.main(version_base="1.3", config_path="conf", config_name="generate")
def main(cfg: DictConfig) -> None:
    with cli.user_errors():
        run(cfg)


if __name__ == "__main__":
    main()
