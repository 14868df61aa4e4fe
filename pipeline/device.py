"""Device and dtype choice: bf16 on CUDA by default, fp32 on CPU (autocast is never used)."""

from __future__ import annotations

from pipeline.errors import ConfigError


def cuda_available() -> bool:
    """Ask the CUDA driver directly, so a cached run can decide its store key without
    importing torch (which takes seconds on a small CPU)."""
    import ctypes
    import importlib.util
    import re
    import sys
    from pathlib import Path

    if "torch" in sys.modules:  # already paid for: ask torch itself
        return bool(sys.modules["torch"].cuda.is_available())
    # A driver is not enough: a CPU-only torch build (what `make setup` pins) on a GPU machine
    # runs on the CPU, so the store key must not say bfloat16. Read torch/version.py, no import.
    spec = importlib.util.find_spec("torch")
    try:
        version_py = Path(spec.origin).parent / "version.py" if spec and spec.origin else None
        if version_py is None or re.search(r"^cuda\s*(:[^=]*)?=\s*None\s*$", version_py.read_text(), re.M):
            return False
    except OSError:
        pass
    try:
        lib = ctypes.CDLL("libcuda.so.1")
        count = ctypes.c_int(0)
        return lib.cuInit(0) == 0 and lib.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0
    except OSError:
        return False


def device_type(name: str) -> str:
    """'cuda' or 'cpu' (or 'mps') for a configured device, without importing torch."""
    if name == "auto":
        return "cuda" if cuda_available() else "cpu"
    return name.split(":", 1)[0]


def compute_dtype_name(requested: str, device: str) -> str:
    """The weights dtype a run will use: 'auto' = bfloat16 on CUDA, float32 elsewhere."""
    if requested != "auto":
        return requested
    return "bfloat16" if device_type(device) == "cuda" else "float32"


def resolve_device(name: str):
    """'auto' picks CUDA when available; asking for CUDA without one is an error, not a fallback."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"extract.device: {name!r} requested but CUDA is not available (use 'cpu' or 'auto')")
        index = int(name.split(":", 1)[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"extract.device: {name!r} but only {torch.cuda.device_count()} CUDA device(s) are visible")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("extract.device: 'mps' requested but not available")
    return torch.device(name)


def resolve_dtype(name: str, device):
    import torch

    return getattr(torch, compute_dtype_name(name, device.type))
