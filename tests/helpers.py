"""Small helpers for tests: random tensors of a dtype, and dtype-rounded float64 copies."""
from __future__ import annotations

import numpy as np
import torch

from tritonlab.kernels._accuracy import tolerance  # noqa: F401  (re-exported for tests)
from tritonlab.kernels._accuracy import assert_close, rel_error, to_numpy  # noqa: F401
from tritonlab.cases import graph_replay  # noqa: F401  (the report's CUDA-graph capture, for GPU tests)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def rand(*shape: int, dtype: torch.dtype = torch.float32, device="cpu", scale: float = 1.0) -> torch.Tensor:
    """Standard normal * scale, drawn in float32 and cast (never zeros or ones)."""
    return (scale * torch.randn(*shape)).to(device=device, dtype=dtype)


def np64(t: torch.Tensor | None) -> np.ndarray | None:
    """The exact values of a (possibly low-precision) tensor as float64 NumPy, for references."""
    return None if t is None else to_numpy(t)



def record_launches(monkeypatch, module, kernel_name: str, *keys: str) -> list:
    """Replace `module.<kernel_name>` by a proxy that launches the real kernel and records, per launch,
    the tuple of the named launch keyword arguments (block sizes, constexprs, num_stages, ...)."""
    launched: list = []
    real = getattr(module, kernel_name)

    class _Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launched.append(tuple(kwargs[k] for k in keys))
                return real[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(module, kernel_name, _Recorder())
    return launched


def check_grads(run, formula, tensors, dy) -> None:
    """Gradients of run(*tensors) against autograd through `formula` in float64, for the upstream
    gradient dy: every input that is not None must get a gradient of its own dtype, within twice the
    float32 tolerance."""
    ours = [None if t is None else t.detach().clone().requires_grad_() for t in tensors]
    run(*ours).backward(dy)
    ref64 = [None if t is None else t.detach().double().requires_grad_() for t in tensors]
    formula(*ref64).backward(dy.double())
    for i, (a, r) in enumerate(zip(ours, ref64)):
        if a is not None:
            assert a.grad is not None and a.grad.dtype == a.dtype, f"input {i}: no gradient"
            assert_close(a.grad, r.grad, 2 * tolerance(torch.float32), what=f"grad of input {i}")


def run_in_fresh_thread(fn) -> None:
    """Run fn() in a new thread (fresh thread-local state, such as the CPU fallbacks' scratch
    buffers) and re-raise what it raised here."""
    import threading

    errors = []

    def target():
        try:
            fn()
        except BaseException as e:  # noqa: BLE001  (re-raised in the calling thread)
            errors.append(e)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
