"""The package's face: what `import cycle` offers a script, and that it stays cheap."""

import subprocess
import sys
from pathlib import Path

import cycle

ROOT = Path(__file__).resolve().parent.parent


def test_every_public_name_resolves_to_the_object_in_its_module():
    from cycle.cam import grad_cam
    from cycle.lungseg.masks import predict
    from cycle.shard_builder import build_shards

    missing = [name for name in cycle.__all__ if getattr(cycle, name, None) is None]
    assert not missing
    assert cycle.grad_cam is grad_cam and cycle.predict_lungs is predict
    assert cycle.build_shards is build_shards


def test_import_cycle_loads_no_torch_ray_or_mlflow():
    code = (
        "import sys, cycle; cycle.Config; "
        "print(sorted(m for m in ('torch', 'ray', 'mlflow') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_an_unknown_name_is_an_attribute_error():
    try:
        cycle.no_such_thing  # noqa: B018
    except AttributeError as err:
        assert "no_such_thing" in str(err)
    else:
        raise AssertionError("expected AttributeError")


def _filtered_python(code: str) -> subprocess.CompletedProcess:
    """`code` run in a Python whose output passes the chatter filter, as a job's does."""
    prelude = (
        "from cycle.console import hide_chatter\nhide_chatter(('has constructor arguments',))\n"
    )
    return subprocess.run(
        [sys.executable, "-c", prelude + code], capture_output=True, text=True, cwd=ROOT, timeout=60
    )


def test_library_chatter_is_dropped_from_a_job_s_output_whoever_writes_it():
    """`hide_chatter` filters at the file descriptors: a line written past Python (as Ray's C++
    core writes) goes too, every other line comes through, and what is still in the pipes at
    exit (an unfinished line, the message of `sys.exit`) is not lost."""
    proc = _filtered_python(
        "import os, sys\n"
        "print('one', flush=True)\n"
        "os.write(2, b'[E core_worker.cc] Actor X has constructor arguments in the store\\n')\n"
        "os.write(1, b'two\\n')\n"
        "print('three', end='')\n"
        "sys.exit('error: four')\n"
    )
    assert proc.returncode == 1
    assert (proc.stdout, proc.stderr) == ("one\ntwo\nthree", "error: four\n")


def test_a_stalled_stage_s_last_words_survive_the_filter():
    """A stalled stage ends with `os._exit` (a blocked `fit()` cannot be interrupted), which runs
    no exit handlers: its message must still get through the filter's pipes (a `ray job submit`
    of a trainer too big for the cluster once ended with exit code 3 and no reason)."""
    proc = _filtered_python(
        "import threading\n"
        "from cycle.watchdog import Watchdog\n"
        "print('working', flush=True)\n"
        "with Watchdog('cycle 0 train', 0.2, lambda waited: 'made no progress for 0.2 s'):\n"
        "    threading.Event().wait(60)\n"
    )
    assert proc.returncode == 3
    assert proc.stdout == "working\n"
    assert "error: made no progress for 0.2 s" in proc.stderr
