"""Lethe checkpoints in EleutherAI's lm-evaluation-harness (zero-shot tasks: LAMBADA, HellaSwag,
PIQA, ARC, WinoGrande, ...): `LetheLM`, registered with the harness as "lethe".

    lm_eval --model lethe --model_args ckpt=<run>/checkpoints/best.ckpt --tasks hellaswag
    python eval.py ckpt=<run or sweep dir> tasks=paper          # the Mamba paper's six tasks + LAMBADA ppl

Every Lethe model (Mamba, Mamba-2, hybrids, Transformer++) scores with its checkpoint's own
tokenizer, without an export step:

- loglikelihood: each (context, continuation) is one forward pass over context + continuation;
  requests are sorted longest first and batched, right-padded (the models are causal, so padding
  after a row never changes its logits, and its positions are never read);
- loglikelihood_rolling: the text in windows of max_length tokens, each predicting its tokens
  from those before it in the window (the harness's rolling windows, context 1): the summed NLL
  eval.py gives the same text cut into blocks;
- generate_until: Lethe's recurrent decoding (lethe.generation), greedy, stopping at the
  request's stop sequences or its max_gen_toks.
A context longer than max_length is cut from the left; how many were cut is counted and warned.

lm_eval's own CLI finds "lethe" through the start-up hook the package installs
(lethe.lm_eval_plugin); `python -m lethe.harness` is the same CLI for a checkout used without
installing.
"""

import sys
import warnings

import lm_eval.models  # noqa: F401  (the harness's own models first: its registry loads them only while empty)
import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm.auto import tqdm

from lethe.cli import error_message, print_error, user_errors
from lethe.errors import ConfigError, LetheError, first_line, require_int
from lethe.generation import generate
from lethe.training.checkpoint import load_trained_model

DEFAULT_MAX_LENGTH = 2048  # the harness's HF default, for models without a max_seq_len (SSMs)
# the Mamba paper's zero-shot set (Table 3): LAMBADA (acc and perplexity), HellaSwag, PIQA, ARC-e, ARC-c, WinoGrande
TASK_PRESETS = {"paper": ["lambada_openai", "hellaswag", "piqa", "arc_easy", "arc_challenge", "winogrande"]}


@register_model("lethe")
class LetheLM(TemplateLM):
    def __init__(self, ckpt: str | None = None, batch_size: int | str = 8, max_length: int | None = None,
                 device: str | None = None, max_gen_toks: int = 256, loaded=None, **_harness_kwargs):
        """ckpt: a Lethe checkpoint (or `loaded`: its (model, tokenizer), already in memory);
        batch_size: requests per forward pass; max_length: the most tokens a forward pass sees
        (default: the model's max_seq_len, else 2048); device: default CUDA when there is one."""
        super().__init__()
        batch_size = int(batch_size) if str(batch_size).isdigit() else batch_size
        require_int("batch_size", batch_size)
        if loaded is None and ckpt is None:
            raise ConfigError("the lethe harness model needs a checkpoint: --model_args ckpt=<run>/checkpoints/best.ckpt")
        self.model, self.tokenizer = loaded or load_trained_model(ckpt)[:2]
        if device and device.startswith("cuda") and not torch.cuda.is_available():  # lm_eval's CLI default is cuda
            warnings.warn(f"lethe: device={device} but this machine has no CUDA device; scoring on the CPU", stacklevel=2)
            device = "cpu"
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self._device)
        self.batch_size = batch_size
        self.max_length = int(max_length or self.model.max_seq_len or DEFAULT_MAX_LENGTH)
        require_int("max_length", self.max_length, 2)
        self.max_gen_toks = int(max_gen_toks)
        self.truncated = 0  # contexts cut from the left to fit max_length

    # how lm_eval's CLI and simple_evaluate(model="lethe") build the model: its errors then end that run
    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        sys.excepthook = _one_line_errors
        return super().create_from_arg_string(arg_string, additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        sys.excepthook = _one_line_errors
        return super().create_from_arg_obj(arg_dict, additional_config)

    # ---- what TemplateLM needs -----------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def device(self):
        return self._device

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer(string, add_special_tokens=False)["input_ids"]

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    # ---- scoring -------------------------------------------------------------------------
    def _fit(self, tokens: list[int], keep: int) -> list[int]:
        """The last `keep` tokens, counting a cut."""
        if len(tokens) > keep:
            self.truncated += 1
            return tokens[-keep:]
        return tokens

    @torch.no_grad()
    def _score(self, rows: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
        """rows: (tokens, n): the summed log-probability of each row's last n tokens given the
        ones before them, and whether each was the argmax; longest first, batched."""
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        results: list = [None] * len(rows)
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        for batch in tqdm(batches, desc="lethe: scoring", disable=len(batches) < 2, file=sys.stderr):
            inputs = [rows[i][0][:-1] for i in batch]
            width = len(inputs[0])
            ids = torch.full((len(batch), width), self.eot_token_id, dtype=torch.long)
            for r, tokens in enumerate(inputs):
                ids[r, :len(tokens)] = torch.tensor(tokens)
            logits = self.model(ids.to(self._device))
            for r, i in enumerate(batch):
                tokens, n = rows[i]
                targets = torch.tensor(tokens[-n:])
                # only the scored positions through log-softmax: (batch, length, vocab) twice would not fit at 50k vocab
                scored = F.log_softmax(logits[r, len(tokens) - 1 - n: len(tokens) - 1, : self.model.vocab_size], dim=-1).cpu()
                greedy = bool((scored.argmax(-1) == targets).all())
                results[i] = (float(scored.gather(-1, targets[:, None]).sum()), greedy)
        return results

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        rows = []
        for _, context, continuation in requests:
            tokens = self._fit(context + continuation, self.max_length + 1)  # max_length inputs, the last predicted
            rows.append((tokens, min(len(continuation), len(tokens) - 1)))
        results = self._score(rows)
        self._warn_truncated()
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        rows, owner = [], []
        for index, request in enumerate(requests):
            (text,) = request.args
            windows = get_rolling_token_windows(self.tok_encode(text), self.prefix_token_id, self.max_length, context_len=1)
            for context, predicted in map(make_disjoint_window, windows):
                rows.append((context + predicted, len(predicted)))
                owner.append(index)
        totals = [0.0] * len(requests)
        for index, (logprob, _) in zip(owner, self._score(rows)):
            totals[index] += logprob
        return totals

    # ---- generation ----------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        outputs = []
        for request in tqdm(requests, desc="lethe: generating", disable=disable_tqdm or len(requests) < 2, file=sys.stderr):
            context, gen_kwargs = request.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.pop("until", None) or [self.tok_decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.pop("max_gen_toks", self.max_gen_toks))
            temperature = float(gen_kwargs.pop("temperature", 0.0))
            prompt = self._fit(self.tok_encode(context) or [self.prefix_token_id], max(1, self.max_length - max_new))

            def stop(row, new_tokens, until=until):
                return any(s in self.tok_decode(new_tokens) for s in until)

            new_tokens = generate(self.model, [prompt], max_new, temperature=temperature, stop_when=stop)[0]
            text = self.tok_decode(new_tokens)
            for s in until:  # the text before the first stop sequence
                text = text.split(s)[0]
            outputs.append(text)
        self._warn_truncated()
        return outputs

    def _warn_truncated(self):
        if self.truncated:
            warnings.warn(f"lethe: {self.truncated} contexts were longer than max_length={self.max_length} tokens "
                          "and were cut from the left", stacklevel=2)
            self.truncated = 0


def hub_unreachable(what: str, exc: BaseException) -> str:
    return (f"{what} needs its dataset from the Hugging Face hub, which cannot be reached here ({first_line(exc)}); "
            "run where it can (the data is then cached in HF_DATASETS_CACHE), copy that cache here, "
            "or score a local task (a directory of task YAMLs: eval.py include_path=DIR, lm_eval --include_path DIR)")


def _one_line_errors(kind, exc, traceback, shown_by_python=sys.excepthook):
    """For lm_eval's CLI, whose errors are not ours to catch: an uncaught Lethe user error, or the
    hub out of reach, is one line instead of a traceback from deep inside datasets."""
    message = error_message(exc)
    if message is None and isinstance(exc, ConnectionError) and "on the Hub" in str(exc):
        message = hub_unreachable("a task", exc)
    if message is None:
        shown_by_python(kind, exc, traceback)
    else:
        print_error(message)


def task_names(tasks) -> list[str]:
    """A preset name (`paper`), a comma-separated string or a list, as a list of task names."""
    if isinstance(tasks, str):
        return list(TASK_PRESETS.get(tasks, [t.strip() for t in tasks.split(",") if t.strip()]))
    return [name for task in tasks for name in task_names(str(task))]


def run_tasks(lm: LetheLM, tasks, limit: int | float | None = None, include_path=None) -> dict:
    """Score `lm` on the harness's tasks: {task: {metric: value, metric + "_stderr": value}}, the
    metrics each task defines (acc, acc_norm, perplexity, ...). A task the harness does not know,
    or whose data cannot be had (offline), is a one-line LetheError naming it."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager, get_task_dict

    names = task_names(tasks)
    if not names:
        raise ConfigError("tasks= is empty: name harness tasks (tasks=[hellaswag,piqa]) or a preset (tasks=paper)")
    manager = None
    if include_path:  # only your own tasks: skip indexing the harness's ~14k task files (most of a minute)
        manager = TaskManager(include_path=str(include_path), include_defaults=False)
        manager = manager if set(names) <= set(manager.all_tasks) else None
    manager = manager or TaskManager(include_path=str(include_path) if include_path else None)
    known = set(manager.all_tasks)
    loaded = []
    for name in names:
        if name not in known:
            where = f" or in include_path={include_path}" if include_path else " (custom tasks: include_path=<dir of task YAMLs>)"
            raise ConfigError(f"task {name!r} is not one of the harness's {len(known):,} tasks{where}")
        try:
            loaded.extend(get_task_dict([name], manager).values())  # loads its data: a failure names the task
        except FileNotFoundError as exc:
            raise LetheError(f"task {name}: a data file is missing ({first_line(exc)})") from None
        except OSError as exc:  # datasets' ConnectionError when the hub cannot be reached
            raise LetheError(hub_unreachable(f"task {name}", exc)) from None
    output = simple_evaluate(model=lm, tasks=loaded, limit=limit, task_manager=manager, log_samples=False)
    scores = {}
    for task, results in output["results"].items():
        scores[task] = {}
        for key, value in results.items():
            metric, _, filter_name = key.partition(",")
            if filter_name and isinstance(value, (int, float)):
                scores[task][metric] = float(value)  # "acc", "acc_stderr", ... (filter "none" dropped)
    return scores


def main() -> None:
    """lm_eval's own command line, with Lethe's model registered: `--model lethe --model_args ckpt=...`."""
    from lm_eval.__main__ import cli_evaluate

    with user_errors():
        cli_evaluate()


if __name__ == "__main__":
    main()
