"""The products with W that decisions make: float32 over the whole vocabulary (numpy, the compiled int8
product, or torch on a device) and float64 on a few rows, each within certify.py's rounding bounds."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .q8 import Q8Rows
from .threads import matvec_pool, matvec_threads

_DEVICE_BLOCK_ROWS = 16384  # rows per elementwise product on the device (a 16384 x d float32 temporary)


def _in_parts(count: int, min_split: int, work: Callable[[int, int], Any]) -> list:
    """[work(start, stop) for each part] over [0, count) split into one part per product thread
    (`matvec_threads`), on the worker pool; one part in the calling thread below `min_split` items,
    where threads only cost."""
    parts = matvec_threads() if count >= min_split else 1
    bounds = [int(b) for b in np.linspace(0, count, parts + 1)]
    if parts == 1:
        return [work(0, count)]
    return list(matvec_pool().map(lambda k: work(bounds[k], bounds[k + 1]), range(parts)))


class MatrixProducts:
    """Products with the model's W (float32, v x d; set by Basis, with its lock `_lazy`) and where they run."""

    W: np.ndarray
    vocab_size: int

    def _init_products(self) -> None:
        self._device_W: Any = None  # a torch copy of W where set_matvec_device put the product
        self._q8: Q8Rows | None | bool = False  # int8 rows for the compiled product (False: not looked at yet)
        self._host_numpy = False  # set_matvec_device("numpy")

    def set_matvec_device(self, device: Any) -> None:
        """Where the product over the vocabulary runs. None (the default): on the host, with the compiled
        int8 product where W is Q8_0 (bat_core/q8.py), else numpy; "numpy": numpy's float32 product in
        any case; a torch device (e.g. the engine's GPU, which the logits come from): torch there, with
        a float32 copy of W (4 v d bytes).

        The certificates' rounding bound holds for any summation order and fused multiply-adds, but
        not for TensorFloat-32, which a GPU matrix product may use (torch's TF32 settings are global
        and belong to the engine): the product is therefore an elementwise multiply and a float32 sum,
        which no TF32 setting touches (`bench_vllm_gpu.py` measures its error against the bound)."""
        if device is None or device == "numpy":
            self._device_W = None
            self._host_numpy = device == "numpy"
            return
        import torch

        device = torch.device(device)
        if self._device_W is None or self._device_W.device != device:
            self._device_W = torch.from_numpy(self.W).to(device)

    @property
    def matvec_device(self) -> str:
        """Where `matvec` runs: "numpy", "q8" (the compiled int8 product, bat_core/q8.py) or a torch device."""
        if self._device_W is not None:
            return str(self._device_W.device)
        return "numpy" if self._host_numpy or self._q8_rows() is None else "q8"

    def _q8_rows(self) -> Q8Rows | None:
        """W as Q8_0 int8 blocks, when it is made of them and the kernel builds here (checked once)."""
        if self._q8 is False:
            with self._lazy:
                if self._q8 is False:
                    self._q8 = Q8Rows.of(self.W)
        return self._q8

    def matvec(self, y: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """W @ y in float32 over the whole vocabulary, split by rows over worker threads: on int8 rows
        where W is Q8_0 (a quarter of the bytes to read), else numpy's float32 product, or on
        set_matvec_device's device. All three stay within certify.py's rounding bound. `out`: a
        contiguous float32 vector of length v to write it into."""
        y = np.ascontiguousarray(y, dtype=np.float32)
        if out is None:
            out = np.empty(self.vocab_size, dtype=np.float32)
        if self._device_W is not None:
            out[:] = self._device_product(y)
            return out
        q8 = None if self._host_numpy else self._q8_rows()

        def work(start: int, stop: int) -> None:
            if q8 is not None:
                q8.product(y, out, start, stop)
            else:
                np.matmul(self.W[start:stop], y, out=out[start:stop])

        _in_parts(self.vocab_size, 16384, work)
        return out

    def _device_product(self, y: np.ndarray) -> np.ndarray:
        """W @ y on the device in plain float32 arithmetic, by blocks of rows."""
        import torch

        W = self._device_W
        y_dev = torch.from_numpy(y).to(W.device)
        out = torch.empty(W.shape[0], dtype=torch.float32, device=W.device)
        for start in range(0, W.shape[0], _DEVICE_BLOCK_ROWS):
            stop = start + _DEVICE_BLOCK_ROWS
            torch.sum(W[start:stop] * y_dev, dim=1, out=out[start:stop])
        return out.cpu().numpy()

    def rows(self, token_ids: np.ndarray) -> np.ndarray:
        """Rows of W for token_ids as float64 (a small gather)."""
        return self.W[token_ids].astype(np.float64)

    @property
    def rows_product_native(self) -> bool:
        """Whether `rows_product` runs compiled on the int8 rows (else on float64 copies of the rows)."""
        return not self._host_numpy and self._q8_rows() is not None

    def rows_product(self, token_ids: np.ndarray, Y: np.ndarray) -> np.ndarray:
        """W[token_ids] @ Y in float64 ([n, m]; Y: [d, m])."""
        if self.rows_product_native:
            return self._q8.rows_product(token_ids, Y)
        return self.rows(token_ids) @ Y
