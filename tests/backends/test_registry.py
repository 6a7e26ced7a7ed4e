"""Backend selection: names, the environment variable, clear errors, no silent fallback."""
import os
import subprocess
import sys

import pytest
import torch

import tropfast
from tropfast import backends


def test_available_reports_every_backend_with_a_reason():
    status = backends.available()
    assert set(status) == set(backends.NAMES)
    assert status["torch"].available
    for s in status.values():
        assert isinstance(s.reason, str) and s.reason
        assert s.name in str(s)


def test_auto_picks_an_available_backend_for_cpu():
    name = backends.resolve("auto", torch.device("cpu"), torch.float32)
    assert name in ("cpu", "torch") and backends.available()[name].available


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="'fast' is not a backend"):
        backends.resolve("fast", torch.device("cpu"))


def test_env_var_is_honoured(monkeypatch):
    monkeypatch.setenv("TROPFAST_BACKEND", "torch")
    assert backends.resolve(None, torch.device("cpu")) == "torch"
    monkeypatch.setenv("TROPFAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match="TROPFAST_BACKEND='bogus'"):
        backends.resolve(None, torch.device("cpu"))
    # an explicit argument wins over the environment
    assert backends.resolve("torch", torch.device("cpu")) == "torch"


def test_unavailable_or_wrong_device_raises_with_the_reason():
    status = backends.available()
    A, B = torch.randn(2, 3), torch.randn(4, 2)
    for name in ("cpu", "cuda", "triton"):
        if not status[name].available:
            with pytest.raises(backends.BackendUnavailable, match=name):
                tropfast.hsd_grad(A, B, A, B, backend=name)
    # not built, or built but these are CPU tensors: either way an error that names it
    with pytest.raises(backends.BackendUnavailable, match="cuda"):
        tropfast.solve(A, B, backend="cuda")


def test_force_fallback_disables_the_compiled_kernels():
    code = "import tropfast; s = tropfast.backends.available()['cpu']; print(s.available, s.reason)"
    env = dict(os.environ, TROPFAST_FORCE_FALLBACK="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.startswith("False") and "TROPFAST_FORCE_FALLBACK" in out.stdout


def test_import_never_fails_without_the_extension():
    code = "import tropfast, torch; print(float(tropfast.hsd_loss(*[torch.ones(2, 2)] * 4)))"
    env = dict(os.environ, TROPFAST_FORCE_FALLBACK="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0.0"
