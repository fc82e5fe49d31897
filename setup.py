"""Everything about the package is in pyproject.toml; this file only adds one step to the build:
install src/lethe-lm-eval.pth beside the package, so lm_eval's own CLI finds `--model lethe`
(see src/lethe/lm_eval_plugin.py). Wheels get it from build_lib; an editable install (make
install) from the editable wheel's root, which is where setuptools installs the library there."""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

STARTUP_HOOK = "src/lethe-lm-eval.pth"


class BuildWithStartupHook(build_py):
    def run(self):
        super().run()
        root = self.get_finalized_command("install").install_lib if self.editable_mode else self.build_lib
        self.copy_file(STARTUP_HOOK, os.path.join(root, os.path.basename(STARTUP_HOOK)))


setup(cmdclass={"build_py": BuildWithStartupHook})
