"""The prepared GPU check runs in its tiny CPU form, so it cannot rot; its correctness gate can fail."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", PATH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_cpu_smoke_prints_every_part(gpu_check, capsys, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rc = gpu_check.main(["--cpu-smoke", "--out", str(tmp_path / "g.json")])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert rc == 0, out
    for part in ("1 correctness", "2 sharpness", "3 engine", "4 distributed", "step avgsam", "Lanczos top-5"):
        assert part in out
    assert (tmp_path / "g.json").read_text().count('"correct": true') == 1


def test_correctness_gate_fails_on_a_difference(gpu_check, monkeypatch, capsys):
    assert gpu_check.rel(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0 + 1e-6])) > gpu_check.CORRECT_RTOL
    monkeypatch.setattr(gpu_check, "correctness", lambda device, smoke: [("HVP", 1e-3)])
    monkeypatch.setattr(gpu_check, "sharpness_speed", lambda *a: [])
    monkeypatch.setattr(gpu_check, "engine_throughput", lambda *a: ([], {}))
    assert gpu_check.main(["--cpu-smoke"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_without_a_gpu_the_full_check_refuses_in_one_line(gpu_check, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    assert gpu_check.main([]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--cpu-smoke" in err
