"""make chaos, the short version: scripts/chaos.py with a couple of hundred jobs and one fault of
each kind, on free ports in a temporary VAR_DIR. Nothing accepted may be lost."""

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from tests.procs import ROOT

pytestmark = pytest.mark.timeout(900)

FAULTS = ("worker_sigkill", "pool_sigkill", "worker_sigterm", "redis_restart", "redis_sigkill", "injected_crash")


def _chaos_module():
    spec = importlib.util.spec_from_file_location("chaos_script", ROOT / "scripts" / "chaos.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_short_chaos_run_loses_no_job(tmp_path):
    var = tmp_path / "var"
    ledger_path = tmp_path / "ledger.json"
    argv = [sys.executable, "scripts/chaos.py", "--jobs", "200", "--duration", "30", "--fault-rounds", "1",
            "--crash-probability", "0.1", "--visibility-timeout", "15", "--drain-timeout", "120",
            "--var-dir", str(var), "--json", str(ledger_path), "--seed", "4"]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    out = ""
    try:
        try:
            out, _ = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)  # chaos.py tears its stack down on SIGTERM
            out, _ = proc.communicate(timeout=200)
            pytest.fail(f"chaos.py ran past 600s:\n{out[-6000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        # Whatever happened above, nothing of this run may outlive the test.
        subprocess.run([sys.executable, "scripts/stack.py", "down"], cwd=ROOT, capture_output=True, timeout=150,
                       env={**os.environ, "VAR_DIR": str(var)})
        stack = _chaos_module().Stack(var, {})
        left = stack.our_processes()
        for p in left:
            try:
                os.kill(p["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass
    print(out[-6000:])  # the ledger, shown by pytest -rA (or on failure)
    assert not left, f"processes left after chaos.py exited: {left}"
    if proc.returncode != 0:  # keep the evidence (ledger, logs, Redis AOF) where pytest will not rotate it away
        keep = ROOT / "var" / "chaos-test-last-failure"
        shutil.rmtree(keep, ignore_errors=True)
        shutil.copytree(tmp_path, keep, ignore=shutil.ignore_patterns("*.sock"))
        (keep / "output.txt").write_text(out)
        pytest.fail(f"chaos.py exited {proc.returncode} (evidence kept in {keep}):\n{out[-8000:]}")
    ledger = json.loads(ledger_path.read_text())
    assert ledger["lost"] == 0 and ledger["all_accepted_terminal"], out[-8000:]
    assert ledger["violations"] == [], ledger["violations"]
    assert ledger["submitted"] == 200 and ledger["accepted"] > 150, out[-8000:]
    terminal = ledger["succeeded"] + ledger["failed"] + ledger["expired"] + ledger["cancelled"]
    assert terminal == ledger["accepted"], ledger
    assert ledger["succeeded"] > 100 and ledger["cancelled"] > 0, ledger
    assert all(ledger["faults"][kind] >= 1 for kind in FAULTS), (ledger["faults"], ledger["fault_failures"])
    assert "chaos ledger" in out and "lost                 0" in out
