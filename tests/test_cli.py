"""The ``resode`` command as a user meets it (issue 12): every failure exits non-zero with one
line that says what failed and how to fix it, no traceback unless ``--debug``; bad inputs are
refused before anything runs (exit 2); REPORT.md shows only results of the preset it is about;
damaged checkpoints inside a sweep are retrained, naming the folder.

Every test runs the command in a subprocess, as a user would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def resode(*args: str, env: dict[str, str] | None = None, timeout: int = 600):
    """Run ``resode ARGS``; return (exit status, stdout + stderr)."""
    e = dict(os.environ, OMP_NUM_THREADS="1")
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e.pop("RESODE_DEBUG", None)
    e.update(env or {})
    p = subprocess.run([sys.executable, "-m", "resode.cli", *args], capture_output=True,
                       text=True, env=e, cwd=ROOT, timeout=timeout)  # fmt: skip
    return p.returncode, p.stdout + p.stderr


def error_lines(output: str) -> list[str]:
    return [ln for ln in output.splitlines() if ln.startswith("resode:")]


def assert_clean_failure(rc: int, output: str, expected_rc: int, *words: str) -> None:
    assert rc == expected_rc, output
    assert "Traceback" not in output, output
    lines = error_lines(output)
    assert lines, output
    for w in words:
        assert any(w in ln for ln in lines), (w, lines)


# ----------------------------------------------------------------------------- bad inputs
NO_SUCH_DEVICES = [("run", "tpu"), ("reproduce", "cuda:7")] + (
    [] if torch.cuda.is_available() else [("run", "cuda"), ("reproduce", "cuda")]
)


@pytest.mark.parametrize(("command", "device"), NO_SUCH_DEVICES)
def test_unavailable_device_is_one_line_exit_2(tmp_path, command, device):
    args = ["run", "heun-depth"] if command == "run" else ["reproduce"]
    rc, out = resode(*args, "--preset", "smoke", "--device", device, "--out", str(tmp_path))
    assert_clean_failure(rc, out, 2, f"--device '{device}'", "available", "cpu")
    assert len(error_lines(out)) == 1
    assert list(tmp_path.iterdir()) == []  # refused before anything ran


def test_out_that_is_a_file_or_unwritable_is_one_line_exit_2(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    rc, out = resode("run", "memory", "--preset", "smoke", "--out", str(f))
    assert_clean_failure(rc, out, 2, "is a file, not a directory")
    rc, out = resode("reproduce", "--preset", "smoke", "--out", str(f / "sub"))
    assert_clean_failure(rc, out, 2, "cannot be written", "choose a writable directory")
    rc, out = resode("run", "memory", "--preset", "smoke", "--out", "/proc/resode-results")
    assert_clean_failure(rc, out, 2, "cannot be written")


def test_missing_data_root_is_one_line_exit_2(tmp_path):
    rc, out = resode("run", "tied-depth", "--preset", "smoke", "--out", str(tmp_path),
                     "--data-root", str(tmp_path / "no-such-dir"))  # fmt: skip
    assert_clean_failure(rc, out, 2, "--data-root", "does not exist")


# ----------------------------------------------------------------------------- failures
def test_failed_experiment_exits_1_with_one_line_and_traceback_only_on_debug(tmp_path):
    (tmp_path / "linear-weights").write_text("a file where the results folder should be")
    rc, out = resode("run", "linear-weights", "--preset", "smoke", "--out", str(tmp_path))
    assert_clean_failure(rc, out, 1, "linear-weights failed", "NotADirectoryError")
    assert len(error_lines(out)) == 1
    for extra, env in ((["--debug"], None), ([], {"RESODE_DEBUG": "1"})):
        rc, out = resode("run", "linear-weights", "--preset", "smoke", "--out", str(tmp_path),
                         *extra, env=env)  # fmt: skip
        assert rc == 1 and "Traceback" in out, out


def test_reproduce_exits_1_and_the_report_marks_the_failure(tmp_path):
    (tmp_path / "linear-weights").write_text("a file where the results folder should be")
    rc, out = resode("reproduce", "--preset", "smoke", "--out", str(tmp_path), "--only",
                     "linear-weights", "reconstruction")  # fmt: skip
    assert_clean_failure(rc, out, 1, "linear-weights FAILED", "1 of 2 experiments failed",
                         "--only linear-weights")  # fmt: skip
    text = (tmp_path / "REPORT.md").read_text()
    assert "| linear-weights | (all claims) | failed: NotADirectoryError" in text
    assert "**failed**" in text and "| reconstruction | reconstruction error" in text
    assert (tmp_path / "reconstruction" / "summary.json").is_file()


# ----------------------------------------------------------------------------- the report
def _claim_rows(text: str, exp_id: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith(f"| {exp_id} |")]


def test_only_updates_its_sections_and_never_mixes_presets(tmp_path):
    out = str(tmp_path)
    assert (
        resode("reproduce", "--preset", "smoke", "--out", out, "--only", "reconstruction")[0] == 0
    )
    first = (tmp_path / "REPORT.md").read_text()
    assert "**reproduced**" in "".join(_claim_rows(first, "reconstruction"))
    assert _claim_rows(first, "memory") == [
        "| memory | (all claims) | not run at preset smoke | - | **not run** | - |"
    ]
    # --only another experiment: reconstruction's section stays, linear-weights' is added
    assert (
        resode("reproduce", "--preset", "smoke", "--out", out, "--only", "linear-weights")[0] == 0
    )
    second = (tmp_path / "REPORT.md").read_text()
    assert _claim_rows(second, "reconstruction") == _claim_rows(first, "reconstruction")
    assert "From an earlier run of this preset." in second
    assert "**reproduced**" in "".join(_claim_rows(second, "linear-weights"))
    # a summary of another preset is never shown in this preset's report
    s = tmp_path / "reconstruction" / "summary.json"
    s.write_text(json.dumps(dict(json.loads(s.read_text()), preset="quick")))
    assert (
        resode("reproduce", "--preset", "smoke", "--out", out, "--only", "linear-weights")[0] == 0
    )
    third = (tmp_path / "REPORT.md").read_text()
    assert _claim_rows(third, "reconstruction") == [
        "| reconstruction | (all claims) | not run at preset smoke (reconstruction/ holds a "
        "quick result) | - | **not run** | - |"
    ]


# ----------------------------------------------------------------------------- checkpoints
def test_sweep_retrains_points_whose_checkpoint_is_unreadable(tmp_path):
    out = str(tmp_path)
    assert resode("run", "tied-depth", "--preset", "smoke", "--out", out)[0] == 0
    summary = tmp_path / "tied-depth" / "summary.json"
    before = json.loads(summary.read_text())["numbers"]
    runs = tmp_path / "tied-depth" / "runs"
    damaged = {"steps1-s0": lambda b: b"not a checkpoint" * 10, "steps2-s0": lambda b: b"",
               "steps4-s0": lambda b: b[: len(b) // 2]}  # garbage, empty, truncated  # fmt: skip
    for point, damage in damaged.items():
        ckpt = runs / point / "checkpoint.pt"
        ckpt.write_bytes(damage(ckpt.read_bytes()))
    rc, out2 = resode("run", "tied-depth", "--preset", "smoke", "--out", out)
    assert rc == 0 and "Traceback" not in out2, out2
    for point in damaged:
        assert f"rerunning point {point}" in out2 and str(runs / point) in out2, out2
    assert json.loads(summary.read_text())["numbers"] == before  # retrained to the same result
    # an interrupted point (no result file) whose checkpoint is damaged starts afresh
    (runs / "steps2-s0.json").unlink()
    (runs / "steps2-s0" / "checkpoint.pt").write_bytes(b"garbage")
    rc, out3 = resode("run", "tied-depth", "--preset", "smoke", "--out", out)
    assert rc == 0 and "Traceback" not in out3, out3
    assert f"checkpoint {runs / 'steps2-s0' / 'checkpoint.pt'} is unreadable" in out3, out3
    assert json.loads(summary.read_text())["numbers"] == before


def test_damaged_checkpoint_read_by_a_measurement_names_the_run_folder(tmp_path):
    from resode.reproduce.training import CheckpointUnreadable, load_model

    bad = tmp_path / "run-a" / "checkpoint.pt"
    bad.parent.mkdir()
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointUnreadable, match=f"delete the run folder {bad.parent}"):
        load_model(bad)


# ----------------------------------------------------------------------------- resode check
def test_check_command_prints_the_table_and_reports_bad_input_in_one_line():
    rc, out = resode("check", "--help")
    assert rc == 0 and "--checkpoint" in out and "--shape" in out
    rc, out = resode("check", "tiny_resnet", "--shape", "1", "28", "28", "--num-classes", "10")
    assert rc == 0, out
    assert "layer1" in out and "recommended" in out and "Traceback" not in out
    rc, out = resode("check", "no_such_model", "--shape", "1", "28", "28")
    assert rc == 2 and "Traceback" not in out
    errors = [ln for ln in out.splitlines() if "error" in ln]
    assert len(errors) == 1 and "unknown model 'no_such_model'" in errors[0], out


def test_gpu_preset_without_a_gpu_and_bad_max_steps_are_one_line_exit_2(tmp_path):
    if not torch.cuda.is_available():
        rc, out = resode("run", "gradient-error", "--preset", "gpu", "--out", str(tmp_path))
        assert_clean_failure(rc, out, 2, "--preset gpu needs a CUDA GPU", "--preset quick")
    rc, out = resode("run", "memory", "--preset", "smoke", "--max-steps", "0", "--out",
                     str(tmp_path))  # fmt: skip
    assert_clean_failure(rc, out, 2, "--max-steps must be a positive number")
