"""The console script's process setup (conceptmon.entry)."""
import os
import subprocess
import sys

from conceptmon.entry import OPENMP_DEFAULTS, set_openmp_defaults


def test_openmp_defaults_fill_in_but_never_override():
    environ = {"GOMP_SPINCOUNT": "7"}
    set_openmp_defaults(environ)
    assert environ["GOMP_SPINCOUNT"] == "7"
    environ = {}
    set_openmp_defaults(environ)
    assert environ == OPENMP_DEFAULTS


def test_the_command_sets_them_before_torch_loads():
    """They only work if set before torch (and its OpenMP runtime) loads: the entry module
    must not import torch, and run() must set them before the CLI imports it."""
    code = ("import sys, os\n"
            "import conceptmon.entry as entry\n"
            "assert 'torch' not in sys.modules\n"
            "sys.argv = ['conceptmon', '--version']\n"
            "try:\n    entry.run()\nexcept SystemExit:\n    pass\n"
            "print(os.environ.get('GOMP_SPINCOUNT'))\n")
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == OPENMP_DEFAULTS["GOMP_SPINCOUNT"]
