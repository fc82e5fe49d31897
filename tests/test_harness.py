"""Lethe checkpoints in lm-evaluation-harness (lethe.harness), with no network: the harness model's
log-likelihoods against a direct forward pass, rolling log-likelihoods against eval.py's summed
NLL, batch sizes, left truncation, stop sequences; local tasks (a 4-choice task and a rolling one,
written here) through eval.py tasks=... and lm_eval's own CLI; an exported Mamba scored by
the harness's own `hf` model gives the same accuracy as `lethe` on the original checkpoint."""

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers import ROOT, assert_one_line, run_script, train_smoke

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is the eval extra: pip install -e .[eval]")
from lm_eval.api.instance import Instance  # noqa: E402

from lethe.data.tokenizer import byte_tokenizer  # noqa: E402
from lethe.errors import ConfigError, LetheError  # noqa: E402
from lethe.generation import generate  # noqa: E402
from lethe.harness import LetheLM, run_tasks, task_names  # noqa: E402
from lethe.models import MambaLM  # noqa: E402
from lethe.training.checkpoint import save_model_checkpoint  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def random_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = MambaLM(vocab_size=257, d_model=32, n_layer=2, d_state=8)
    path = tmp_path_factory.mktemp("random") / "mamba.ckpt"
    save_model_checkpoint(model, byte_tokenizer(), path, source={"format": "test"})
    return path


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    """A 4-choice task over 500 questions (a jsonl and its task YAML) and a rolling-loglikelihood task."""
    root = tmp_path_factory.mktemp("tasks")
    rng = random.Random(0)
    with open(root / "mc.jsonl", "w") as f:
        for i in range(500):
            name = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(3, 8)))
            choices = [f" def {name}_{k}(self):" for k in range(3)] + [f" import {name}"]
            f.write(json.dumps({"question": f"class {name.title()}:\n   ", "choices": choices, "answer": rng.randrange(4)}) + "\n")
    (root / "mc.yaml").write_text(f"""task: lethe_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root / 'mc.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    with open(root / "rolling.jsonl", "w") as f:
        for i in range(6):
            f.write(json.dumps({"text": f"def f{i}(x):\n    return x * {i}\n" * (i + 2)}) + "\n")
    (root / "rolling.yaml").write_text(f"""task: lethe_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root / 'rolling.jsonl'}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: bits_per_byte
""")
    return root


def requests(kind, args):
    return [Instance(request_type=kind, doc={}, arguments=a, idx=0) for a in args]


def direct_logprob(model, tokens, n):
    """log p(last n tokens | the ones before) from one plain forward pass, and the greedy check."""
    with torch.no_grad():
        logprobs = F.log_softmax(model(torch.tensor([tokens[:-1]]))[0, :, : model.vocab_size], dim=-1)
    scored, targets = logprobs[len(tokens) - 1 - n:], torch.tensor(tokens[-n:])
    return scored.gather(-1, targets[:, None]).sum().item(), bool((scored.argmax(-1) == targets).all())


PAIRS = [("import os\n", "import sys"), ("def f(x):\n    return", " x + 1"), ("", "class A:"), ("a = ", "a"),
         ("for i in range(10):\n", "    print(i)\n"), ("x", " = 1")]


# ---- the harness model against direct computations ------------------------------------------------
def test_loglikelihood_is_the_forward_pass_sum_and_greedy_is_the_argmax(random_ckpt):
    lm = LetheLM(ckpt=str(random_ckpt), batch_size=4)
    results = lm.loglikelihood(requests("loglikelihood", PAIRS))
    eos = lm.tokenizer.eos_token_id
    for (context, continuation), (logprob, greedy) in zip(PAIRS, results):
        # the harness's convention: a context's trailing whitespace belongs to the continuation
        stripped = context.rstrip()
        context, continuation = stripped, context[len(stripped):] + continuation
        context_ids = lm.tok_encode(context) if context else [eos]
        continuation_ids = lm.tok_encode(continuation)  # the byte tokenizer splits at any boundary alike
        expected, expected_greedy = direct_logprob(lm.model, context_ids + continuation_ids, len(continuation_ids))
        assert logprob == pytest.approx(expected, abs=1e-4) and greedy == expected_greedy
    # greedy: a continuation made of the model's own argmax tokens is greedy
    # (token level: a random model's bytes need not decode to text that encodes back to them)
    context_ids = lm.tok_encode("def f")
    with torch.no_grad():
        new = generate(lm.model, [context_ids], 5, temperature=0)[0]
    changed = new[:-1] + [(new[-1] + 1) % 256]
    (_, greedy), (_, not_greedy) = lm._loglikelihood_tokens([(None, context_ids, new), (None, context_ids, changed)])
    assert greedy and not not_greedy


def test_batch_sizes_give_the_same_numbers(random_ckpt):
    one = LetheLM(ckpt=str(random_ckpt), batch_size=1).loglikelihood(requests("loglikelihood", PAIRS))
    eight = LetheLM(ckpt=str(random_ckpt), batch_size=8).loglikelihood(requests("loglikelihood", PAIRS))
    for (a, greedy_a), (b, greedy_b) in zip(one, eight):
        assert a == pytest.approx(b, abs=1e-4) and greedy_a == greedy_b


def test_rolling_loglikelihood_is_eval_pys_summed_nll(random_ckpt):
    length = 32
    lm = LetheLM(ckpt=str(random_ckpt), max_length=length)
    text = "".join(random.Random(1).choice("abc def\n") for _ in range(3 * length))  # 3 whole blocks of bytes
    (rolling,) = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(text,)]))
    # eval.py: <eos> + the text as one stream, blocks of `length` inputs each predicting the next token
    stream = torch.tensor([lm.tokenizer.eos_token_id, *lm.tok_encode(text)])
    nll = 0.0
    with torch.no_grad():
        for block in range(3):
            inputs, labels = stream[block * length:(block + 1) * length], stream[block * length + 1:(block + 1) * length + 1]
            nll += F.cross_entropy(lm.model(inputs[None])[0, :, : lm.model.vocab_size], labels, reduction="sum").item()
    assert rolling == pytest.approx(-nll, rel=1e-5)


def test_a_long_context_is_cut_from_the_left_and_counted(random_ckpt):
    lm = LetheLM(ckpt=str(random_ckpt), max_length=16)
    context, continuation = "x = [" + ", ".join(map(str, range(30))) + "]", " # done"
    with pytest.warns(UserWarning, match="1 contexts were longer than max_length=16"):
        ((logprob, _),) = lm.loglikelihood(requests("loglikelihood", [(context, continuation)]))
    tokens = (lm.tok_encode(context) + lm.tok_encode(continuation))[-17:]  # 16 inputs, the last one predicted
    assert logprob == pytest.approx(direct_logprob(lm.model, tokens, len(lm.tok_encode(continuation)))[0], abs=1e-4)


def test_generate_until_decodes_greedily_and_stops_at_the_stop_sequence(random_ckpt):
    lm = LetheLM(ckpt=str(random_ckpt))
    context = "def main():\n"
    with torch.no_grad():
        free_tokens = generate(lm.model, [lm.tok_encode(context)], 40, temperature=0)[0]
    free = lm.tok_decode(free_tokens)
    stop = free[5:7]  # a stop string the greedy continuation reaches
    (text,) = lm.generate_until(requests("generate_until", [(context, {"until": [stop], "max_gen_toks": 40})]))
    assert text == free.split(stop)[0] and len(text) < len(free)
    (capped,) = lm.generate_until(requests("generate_until", [(context, {"until": ["\x00never"], "max_gen_toks": 9})]))
    assert capped == lm.tok_decode(free_tokens[:9])


def test_task_presets_and_refusals(random_ckpt, tasks_dir):
    assert task_names("paper") == ["lambada_openai", "hellaswag", "piqa", "arc_easy", "arc_challenge", "winogrande"]
    assert task_names(["hellaswag", "piqa,arc_easy"]) == ["hellaswag", "piqa", "arc_easy"]
    lm = LetheLM(ckpt=str(random_ckpt))
    with pytest.raises(ConfigError) as info:
        run_tasks(lm, ["no_such_task"], include_path=tasks_dir)
    assert_one_line(info, "'no_such_task'", "include_path=")
    with pytest.raises(LetheError) as info:  # HF_DATASETS_OFFLINE=1 (conftest): the hub is out of reach
        run_tasks(lm, "paper", limit=2)
    assert_one_line(info, "task lambada_openai needs its dataset from the Hugging Face hub", "include_path")


# ---- local tasks end to end -----------------------------------------------------------------------
def test_a_local_multiple_choice_task_scores_500_questions_in_seconds(random_ckpt, tasks_dir):
    import time

    lm = LetheLM(ckpt=str(random_ckpt), batch_size=32)
    start = time.perf_counter()
    scores = run_tasks(lm, ["lethe_mc", "lethe_rolling"], include_path=tasks_dir)
    elapsed = time.perf_counter() - start
    assert 0 <= scores["lethe_mc"]["acc"] <= 1 and scores["lethe_mc"]["acc_stderr"] > 0 and "acc_norm" in scores["lethe_mc"]
    assert scores["lethe_rolling"]["bits_per_byte"] > 0
    print(f"500 questions x 4 choices + 6 rolling documents: {elapsed:.1f} s")


@pytest.fixture(scope="module")
def trained_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    train_smoke(root / "run", root / "data", "trainer.max_steps=20")
    return root / "run" / "checkpoints" / "best.ckpt"


@pytest.mark.slow
def test_eval_py_scores_local_tasks_beside_perplexity(trained_ckpt, random_ckpt, tasks_dir, tmp_path):
    out = tmp_path / "eval"
    proc = run_script("eval.py", f"ckpt=[{trained_ckpt},{random_ckpt}]", "tasks=[lethe_mc,lethe_rolling]",
                      f"harness.include_path={tasks_dir}", "limit=100", "splits=[test]", "lengths=[]",
                      f"out_dir={out}", f"paths.log_dir={tmp_path / 'logs'}", f"paths.data_dir={trained_ckpt.parents[2] / 'data'}",
                      check=False)
    # the random checkpoint has no training data: scoring its test split fails in one line, the trained one's rows stand
    rows = [r for r in json.loads((out / "eval.json").read_text()) if "tasks" in r]
    assert len(rows) == 1 and rows[0]["test"]["ppl"] > 1
    assert 0 <= rows[0]["tasks"]["lethe_mc"]["acc"] <= 1 and rows[0]["tasks"]["lethe_rolling"]["bits_per_byte"] > 0
    assert "lethe_mc acc" in proc.stdout and (out / "tasks.png").stat().st_size > 5000
    # tasks alone: no data needed, for an imported or random checkpoint
    run_script("eval.py", f"ckpt={random_ckpt}", "tasks=[lethe_mc]", f"harness.include_path={tasks_dir}", "limit=50",
               "splits=[]", "lengths=[]", f"out_dir={out}", f"paths.log_dir={tmp_path / 'logs'}")
    (row,) = json.loads((out / "eval.json").read_text())
    assert set(row["tasks"]["lethe_mc"]) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"} and "test" not in row


@pytest.mark.slow
def test_the_harness_command_line_and_hf_export_agree(random_ckpt, tasks_dir, tmp_path):
    from lethe.interop.hf import export_checkpoint

    out = tmp_path / "lethe"
    command = [str(Path(sys.executable).parent / "lm_eval"), "--model", "lethe", "--model_args", f"ckpt={random_ckpt}",
               "--batch_size", "16",
               "--tasks", "lethe_mc", "--include_path", str(tasks_dir), "--limit", "100", "--output_path", str(out)]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results_file,) = out.rglob("results*.json")
    lethe_acc = json.loads(results_file.read_text())["results"]["lethe_mc"]["acc,none"]
    hf_dir = export_checkpoint(random_ckpt, tmp_path / "hf")
    hf = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={hf_dir},dtype=float32,device=cpu", tasks=["lethe_mc"],
                                 limit=100, task_manager=lm_eval.tasks.TaskManager(include_path=str(tasks_dir)), log_samples=False)
    assert hf["results"]["lethe_mc"]["acc,none"] == pytest.approx(lethe_acc, abs=1e-9)
    assert math.isfinite(lethe_acc)


def test_lm_eval_finds_lethe_lazily_beside_its_own_models():
    """The installed start-up hook (lethe-lm-eval.pth -> lethe.lm_eval_plugin), in a fresh
    interpreter: "lethe" is registered once lm_eval's models are, without importing lethe.harness
    (or torch) until a run asks for it, and the harness's own models are all still there."""
    probe = ("import sys, lm_eval.models; from lm_eval.api.registry import get_model, model_registry; "
             "print('lethe.harness' in sys.modules, 'torch' in sys.modules, model_registry._objs['lethe']); "
             "print(get_model('lethe').__module__, get_model('hf').__name__, 'lethe.harness' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split("\n")[:2] == ["False False lethe.harness:LetheLM", "lethe.harness HFLM True"]


@pytest.mark.slow
@pytest.mark.parametrize("ckpt, expected", [("missing", "error: checkpoint {missing} does not exist"),
                                            ("random", "error: a task needs its dataset from the Hugging Face hub")])
def test_lm_eval_cli_errors_are_one_line(ckpt, expected, random_ckpt, tmp_path):
    """A Lethe error (a missing checkpoint) and no network (lambada_openai's data) under lm_eval's
    own CLI end in one `error:` line, not a traceback."""
    missing = tmp_path / "missing.ckpt"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}  # fails at once instead of retrying the network
    proc = subprocess.run([str(Path(sys.executable).parent / "lm_eval"), "--model", "lethe", "--model_args",
                           f"ckpt={missing if ckpt == 'missing' else random_ckpt}", "--tasks", "lambada_openai"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.rstrip().splitlines()[-1].startswith(expected.format(missing=missing)), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
