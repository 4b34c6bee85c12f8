"""A finished run is reused only when it is the same run (rows, model, press configuration, gates); a failing sample
costs its rows, not the run; a killed `eval` resumes without redoing or corrupting finished runs."""

import os
import signal
import subprocess
import sys
import time

from helpers import make_pipeline

from fastkvzip_press import FastKVzipPress, GateBank, ModelLayout
from fastkvzip_press.cli import main
from fastkvzip_press.evaluation.answers import answer_rows
from fastkvzip_press.evaluation.results import collect_runs
from fastkvzip_press.gates import write_native
from fastkvzip_press.models import load_model

FLAGS = ["--data-dir", "400", "--samples", "1", "--tasks", "niah_single_1", "--max-new-tokens", "1"]


def eval_args(saved_tiny, out, gates, *presses):
    args = ["-q", "eval", "--model", str(saved_tiny / "model"), "--gates", str(gates), *FLAGS]
    return [*args, "--presses", *presses, "--ratios", "0.5", "--out", str(out)]


def test_other_gates_are_not_taken_for_finished_runs(saved_tiny, tmp_path, capsys):
    out = tmp_path / "runs"
    assert main(eval_args(saved_tiny, out, saved_tiny / "gates", "no_press", "fastkvzip_press")) == 0
    model = load_model(str(saved_tiny / "model"))[0]
    write_native(GateBank.random(ModelLayout.from_model(model), seed=9), tmp_path / "other_gates")
    capsys.readouterr()
    assert main(eval_args(saved_tiny, out, tmp_path / "other_gates", "no_press", "fastkvzip_press")) == 2
    err = capsys.readouterr().err
    assert "fastkvzip_press__0.50 holds a finished run made with other gates (--gates)" in err
    assert "Use another --out" in err
    # Runs that do not depend on gates are still reused.
    assert main(eval_args(saved_tiny, out, tmp_path / "other_gates", "no_press")) == 0


def test_random_gates_in_eval(saved_tiny, tmp_path):
    assert main(eval_args(saved_tiny, tmp_path / "runs", "random", "fastkvzip_press")) == 0
    assert [run.press_name for run in collect_runs(tmp_path / "runs")] == ["fastkvzip_press"]


def test_a_too_short_sample_fails_alone(llama, random_gates, caplog):
    model, tokenizer = llama
    pipe = make_pipeline(model, tokenizer)
    good = {"context": "the code is 7 2 9 . " * 20, "question": "code ?", "answer_prefix": "", "answer": "7"}
    short = {"context": "hi", "question": "code ?", "answer_prefix": "", "answer": "7"}
    rows = [{**row, "task": "t", "max_new_tokens": 1} for row in (good, short, good | {"context": "x " * 80})]
    press = FastKVzipPress(0.5, gates=random_gates(model), window_size=2)
    answered = answer_rows(pipe, rows, press, progress=False)
    assert [("error" in row) for row in answered] == [False, True, False]
    assert "not more than the protected" in answered[1]["error"] and answered[1]["score"] == 0.0
    assert "1 rows failed" in caplog.text


def test_a_killed_eval_resumes(saved_tiny, tmp_path):
    out = tmp_path / "runs"
    args = eval_args(saved_tiny, out, saved_tiny / "gates", "no_press", "fastkvzip_press", "streaming_llm")
    command = [sys.executable, "-m", "fastkvzip_press.cli", *args[:-4], "--ratios", "0.25", "0.5", "--out", str(out)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not any(out.glob("*/metrics.json")):
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)  # during the next run
    process.wait()
    finished = {path.parent: path.stat().st_mtime_ns for path in out.glob("*/metrics.json")}
    assert finished, "no run finished before the kill"
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert {path: (path / "metrics.json").stat().st_mtime_ns for path in finished} == finished  # not redone
    runs = collect_runs(out)
    assert len(runs) == 5 and all(run.n_rows == 1 for run in runs)
    assert not list(out.rglob("*.tmp"))
