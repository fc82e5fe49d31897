"""What the command lines (train.py, eval.py, generate.py, python -m lethe.interop) share: bad
input ends in one `error:` line and exit status 2, and each script's --help shows its own options.

    with user_errors():          # LetheError / out of memory -> "error: <first line>", exit 2
        run(cfg)
"""

import sys
from contextlib import contextmanager

from omegaconf import OmegaConf

from lethe.config import CONF_DIR as CONF
from lethe.errors import LetheError, first_line

EXIT_USER_ERROR = 2
EXIT_FAILED_JOBS = 3  # a multirun that ran every job, some of which failed


def error_message(exc: BaseException) -> str | None:
    """The one line to show for a user error, or None for a bug (which keeps its traceback)."""
    if isinstance(exc, LetheError):
        return first_line(exc, limit=2000)
    if type(exc).__name__ == "OutOfMemoryError":  # torch's, CPU or CUDA (torch is not imported here: --help stays quick)
        return f"out of memory ({type(exc).__name__}); lower data.batch_size or seq_len, or raise trainer.accumulate_grad_batches"
    return None


def print_error(message: str) -> None:
    """`error: message` on a line of its own: progress bars still open are closed first, or the
    message would be glued to the end of a bar's line."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
    sys.stdout.flush()
    # one write, newline included: the ranks of a multi-process run share the terminal, and a line
    # written in two pieces can be split by another rank's
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()


@contextmanager
def user_errors():
    """Run a command's body: a user error is printed as one line and exits with status 2."""
    try:
        yield
    except Exception as exc:
        message = error_message(exc)
        if message is None:
            raise
        print_error(message)
        sys.exit(EXIT_USER_ERROR)


def config_help(config_name: str) -> str:
    """--help for eval.py and generate.py: the config file itself, its comments being the
    documentation (Hydra's `hydra:` block left out), and the options of the groups it uses."""
    text = (CONF / f"{config_name}.yaml").read_text()
    own = text.split("\nhydra:", 1)[0].rstrip().replace("$", "$$")  # the help template is a string.Template
    defaults = OmegaConf.to_container(OmegaConf.load(CONF / f"{config_name}.yaml")).get("defaults", [])
    groups = [group for entry in defaults if isinstance(entry, dict) for group in entry]
    lines = [f"{group}: {', '.join(sorted(p.stem for p in (CONF / group).glob('*.yaml')))}" for group in groups]
    return (f"{own}\n\n== Config groups (GROUP=OPTION) ==\n" + "\n".join(lines)
            + "\n\nOverride any key above with KEY=VALUE; `--cfg job` prints the composed config; "
              "`--hydra-help` lists Hydra's own flags.\n")


OmegaConf.register_new_resolver("lethe_help", config_help, replace=True)
