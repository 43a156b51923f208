"""`import tritonlab` and every family's torch fallback work where Triton is not installed (DESIGN.md)."""
from __future__ import annotations

import subprocess
import sys

SCRIPT = r'''
import sys
sys.modules["triton"] = None  # any "import triton" now raises ImportError, as on macOS or Windows
import numpy as np, torch, tritonlab
from tritonlab.kernels.tree_routing import reference as tr
from tritonlab.kernels._accuracy import rel_error
x = torch.randn(5, 16)
nw = torch.randn(7, 16)
assert (tritonlab.tree_route(x, nw).numpy() == tr.tree_route_ref(x.double().numpy(), nw.double().numpy())).all()
assert tritonlab.leaf_mlp(x, torch.randint(0, 3, (5,)), torch.randn(3, 16, 4), None, torch.randn(3, 4, 8), None).shape == (5, 8)
q, s = tritonlab.quantize(x, "int8")
assert q.dtype == torch.int8 and rel_error(q.float() * s, x) < 0.02
xs = torch.randn(2, 6, 4)
assert rel_error(tritonlab.fnet_mix(xs), np.fft.fft2(xs.double().numpy(), axes=(1, 2)).real) < 1e-5
assert tritonlab.FastFeedForward(16, 4, 16, 3).eval()(x).shape == (5, 16)
try:
    tritonlab.tree_route(x, nw, backend="triton")
except RuntimeError as e:
    assert "Triton" in str(e)
else:
    raise AssertionError("backend='triton' without Triton did not raise")
print("ok")
'''


def test_import_and_fallbacks_without_triton():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
