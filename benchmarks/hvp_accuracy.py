"""Accuracy of the curvature engine over the toy-net case matrix (float64), printed as a table.

    python benchmarks/hvp_accuracy.py

Per case: P, the largest relative error of ``oba.hvp`` (random v) against the dense ``oba.hessian``
times v, of ``oba.hessian`` against the finite-difference Hessian, of ``oba.hvp`` against finite
differences, and the asymmetry of ``oba.hessian``; the last line gives the worst of each column.
"""

from __future__ import annotations

import torch

import oba
from oba.toynets import TOY_CASES, make_case


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def main() -> None:
    header = f"{'case':22s} {'P':>5s} {'hvp vs H v':>12s} {'H vs FD':>12s} {'hvp vs FD':>12s} {'|H-Hᵀ|/|H|':>12s}"
    print(header)
    worst = [0.0] * 4
    for name in TOY_CASES:
        case = make_case(name)
        primals = oba.select_params(case.model)
        H = oba.hessian(case.model, case.loss_fn, case.batch)
        size = H.shape[0]
        eye = torch.eye(size, dtype=H.dtype)
        fd_cols = [
            oba.flatten_params(
                oba.finite_difference_hvp(case.model, case.loss_fn, case.batch, oba.unflatten_params(eye[i], primals))
            )
            for i in range(size)
        ]
        H_fd = torch.stack(fd_cols, dim=1)
        v = torch.randn(size, dtype=H.dtype, generator=torch.Generator().manual_seed(0))
        hv = oba.flatten_params(oba.hvp(case.model, case.loss_fn, case.batch, oba.unflatten_params(v, primals)))
        row = [rel(hv, H @ v), rel(H, H_fd), rel(hv, H_fd @ v), rel(H, H.T)]
        worst = [max(w, r) for w, r in zip(worst, row, strict=True)]
        print(f"{name:22s} {size:5d} " + " ".join(f"{r:12.2e}" for r in row))
    print(f"{'worst':22s} {'':5s} " + " ".join(f"{r:12.2e}" for r in worst))


if __name__ == "__main__":
    main()
