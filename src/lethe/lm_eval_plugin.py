"""Makes `lm_eval --model lethe ...` work in lm_eval's own command line, which (0.4.13) has no way
to discover a model outside its package. The installed `lethe-lm-eval.pth` imports this module at
interpreter start-up; it imports nothing heavy and only watches for `lm_eval.models`. Right after
that module has registered the harness's own models, "lethe" is added as a lazy placeholder, so
lethe.harness (and torch) load only when a run asks for `--model lethe`.
"""

import importlib.abc
import importlib.util
import sys

MODEL_NAME = "lethe"
TARGET = "lethe.harness:LetheLM"


def register() -> None:
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=TARGET)


class _AfterLmEvalModels(importlib.abc.MetaPathFinder):
    """Finds lm_eval.models as usual, but has its loader call register() once it has run."""

    searching = False

    def find_spec(self, name, path=None, target=None):
        if name != "lm_eval.models" or self.searching:
            return None
        self.searching = True  # find_spec below asks the finders again: not this one
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self.searching = False
        if spec is not None and spec.loader is not None:
            run_module = spec.loader.exec_module

            def exec_then_register(module):
                run_module(module)
                if self in sys.meta_path:  # done: once the module has run
                    sys.meta_path.remove(self)
                register()

            spec.loader.exec_module = exec_then_register
        return spec


def install() -> None:
    if "lm_eval.models" in sys.modules:
        register()
    elif not any(isinstance(finder, _AfterLmEvalModels) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterLmEvalModels())


install()
