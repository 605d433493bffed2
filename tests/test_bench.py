"""The GPU speed harness runs end to end on CPU, so it works unchanged on the first GPU lent."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_speed_harness_compares_stacks_with_equal_losses():
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "speed.py"), "--shapes", "tiny", "--data", "fixed,variable",
         "--stacks", "hf,tuneforge,unsloth", "--device", "cpu", "--steps", "2", "--loss-steps", "3", "--warmup", "1",
         "--seq-len", "256"],
        capture_output=True, text=True, timeout=600, check=True)
    rows = [ln.split("|")[1:-1] for ln in done.stdout.splitlines() if ln.startswith("| tiny")]
    assert [(r[1].strip(), r[2].strip()) for r in rows] == [("fixed", "hf"), ("fixed", "tuneforge"),
                                                              ("variable", "hf"), ("variable", "tuneforge")]
    assert all(r[-1].strip() == "0.00%" for r in rows)  # the same losses as the reference, step by step
    if importlib.util.find_spec("unsloth") is None:  # a peer that is absent is named, not silently left out
        assert "skipped unsloth: unsloth is not installed" in done.stdout


def test_every_command_in_the_results_names_a_script_and_flags_it_takes():
    """bench/RESULTS.md's commands can be rerun: each names a script in bench/ that declares each flag given."""
    import re

    commands = re.findall(r"`(?:python|bash) (bench/[\w.]+)([^`]*)`", (ROOT / "bench" / "RESULTS.md").read_text())
    assert len(commands) > 10
    for script, rest in commands:
        assert (ROOT / script).is_file(), script
        source = (ROOT / script).read_text()
        for flag in re.findall(r"--[a-z][a-z-]*", rest):
            assert f'"{flag}"' in source, (script, flag)
