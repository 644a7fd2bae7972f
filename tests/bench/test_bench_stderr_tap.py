"""The stderr tap that counts model loads: a child process started under it (as the JVM is, and
Spark's Python workers under the JVM) writes into it; its lines are forwarded unchanged and the
package's lines are kept, counted per model version."""
from __future__ import annotations

import os
import subprocess
import sys

from benchmarks.stderr_tap import StderrTap, load_prefix

CHILD = r"""
import sys
# Process 1 loads m version 1 twice (its second line repeated), process 2 once; then other models.
for name, version, pid, load in [("m", "1", 1, 1), ("m", "1", 1, 2), ("m", "1", 1, 2), ("m", "1", 2, 1),
                                 ("m", "10", 1, 3), ("other", "1", 1, 4)]:
    print(f"dolly_spark: loaded {name} version {version} with engine hf on cpu in 0.1s "
          f"(host h, pid {pid}, load {load} of this process)", file=sys.stderr, flush=True)
print("a JVM warning", file=sys.stderr, flush=True)
"""


def test_loads_of_a_child_process_are_counted_per_version_once_each_and_everything_is_forwarded(capfd):
    with StderrTap() as tap:
        subprocess.run([sys.executable, "-c", CHILD], check=True)
        os.write(2, b"dolly_spark: loaded m version 1 in this process\n")  # file descriptor 2, as the JVM writes
        assert tap.count(load_prefix("m", "1")) == 4  # the repeated line counts once
        assert tap.count(load_prefix("m", "10")) == 1
        assert tap.count(load_prefix("other", "1")) == 1
        assert tap.take("in this process") and not tap.take("in this process")
        assert tap.count(load_prefix("m", "1")) == 3
    assert not tap.active
    forwarded = capfd.readouterr().err  # forwarded as written, repeats included
    assert "a JVM warning" in forwarded and forwarded.count("dolly_spark: loaded ") == 7
    os.write(2, b"after the tap\n")
    assert capfd.readouterr().err == "after the tap\n"
