"""Device and dtype choice: fp32 on CPU, bf16 on CUDA by default; asking for CUDA without one is an error."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from pipeline_helpers import PROJECT_ROOT

from pipeline.device import compute_dtype_name, cuda_available, device_type, resolve_device, resolve_dtype
from pipeline.errors import ConfigError

HAS_CUDA = torch.cuda.is_available()


def test_auto_on_cpu_is_float32():
    assert compute_dtype_name("auto", "cpu") == "float32"
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32


def test_auto_on_cuda_names_bfloat16_without_a_gpu():
    # the name is decided from the device string alone (no CUDA needed), so store keys can be computed anywhere
    assert compute_dtype_name("auto", "cuda") == "bfloat16"
    assert compute_dtype_name("auto", "cuda:1") == "bfloat16"
    assert compute_dtype_name("auto", "mps") == "float32"


@pytest.mark.parametrize("name", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("device", ["cpu", "cuda", "auto"])
def test_explicit_dtype_wins(name, device):
    assert compute_dtype_name(name, device) == name


def test_device_type_without_torch():
    assert device_type("cpu") == "cpu"
    assert device_type("cuda:3") == "cuda"
    assert device_type("auto") in ("cpu", "cuda")


def test_driver_probe_agrees_with_torch():
    assert cuda_available() == HAS_CUDA
    assert device_type("auto") == resolve_device("auto").type
    assert compute_dtype_name("auto", "auto") == ("bfloat16" if HAS_CUDA else "float32")


def test_driver_probe_without_torch_agrees_with_torch():
    """The store key's dtype (decided before torch is imported) matches the device the run uses."""
    code = (
        "import sys; from pipeline.device import cuda_available; a = cuda_available(); "
        "assert 'torch' not in sys.modules; import torch; print(a, torch.cuda.is_available())"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    probed, torch_says = out.stdout.split()
    assert probed == torch_says


def test_cpu_only_torch_build_with_a_driver_is_not_cuda(tmp_path, monkeypatch):
    """A GPU machine with the pinned CPU build of torch runs on the CPU: auto must not name bfloat16."""
    import ctypes
    import importlib.util

    fake = tmp_path / "torch"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "version.py").write_text("from typing import Optional\ncuda: Optional[str] = None\n")
    spec = importlib.util.spec_from_file_location("torch", fake / "__init__.py")

    class Driver:  # a working driver with one GPU
        def cuInit(self, flags):
            return 0

        def cuDeviceGetCount(self, ref):
            ref._obj.value = 1
            return 0

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(ctypes, "CDLL", lambda name: Driver())
    monkeypatch.delitem(sys.modules, "torch")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: spec if name == "torch" else real_find_spec(name, *a))
    assert not cuda_available()
    assert compute_dtype_name("auto", "auto") == "float32"
    (fake / "version.py").write_text("from typing import Optional\ncuda: Optional[str] = '12.8'\n")
    assert cuda_available()
    assert compute_dtype_name("auto", "auto") == "bfloat16"


def test_resolve_cpu():
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(HAS_CUDA, reason="needs a machine without CUDA")
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:1"])
def test_cuda_without_cuda_is_a_config_error(name):
    with pytest.raises(ConfigError, match=rf"extract.device: '{name}' requested but CUDA is not available"):
        resolve_device(name)


@pytest.mark.skipif(HAS_CUDA, reason="needs a machine without CUDA")
def test_auto_without_cuda_is_cpu():
    assert resolve_device("auto") == torch.device("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_bf16_on_cuda():
    dev = resolve_device("auto")
    assert dev.type == "cuda"
    assert compute_dtype_name("auto", "auto") == "bfloat16"
    assert resolve_dtype("auto", dev) == torch.bfloat16
    assert resolve_dtype("float32", dev) == torch.float32
    with pytest.raises(ConfigError, match="CUDA device"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")

    from pipeline.models import load, resolve

    model, tok, _ = load(resolve("tiny-random-bert"), device=dev, dtype=resolve_dtype("auto", dev))
    assert next(model.parameters()).dtype == torch.bfloat16
    enc = tok(["a good film", "bad"], padding=True, return_tensors="pt").to(dev)
    with torch.no_grad():
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], output_hidden_states=True)
    assert out.hidden_states[-1].dtype == torch.bfloat16
    assert all(torch.isfinite(h.float()).all() for h in out.hidden_states)
