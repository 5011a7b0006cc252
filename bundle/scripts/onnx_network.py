"""An ONNX model run by ONNX Runtime behind the interface of a ``torch.nn.Module``.

``configs/inference_onnx.yaml`` puts it in the place of ``network_def``, so that MONAI's engines, inferers
and post-processing run an exported ``model.onnx`` unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["OnnxNetwork"]


class OnnxNetwork(torch.nn.Module):
    """Callable like the network it was exported from: ``OnnxNetwork(path)(x)`` returns the first output.

    The input goes to ONNX Runtime as a contiguous float32 NumPy array (on the CPU); the output comes back
    as a float32 tensor on the input's device. There are no parameters: ``.to(device)``, ``.eval()``
    and ``torch.no_grad()`` are accepted and change nothing.

    Args:
        path: the ``.onnx`` file (e.g. from ``python -m monai.bundle onnx_export``).
        providers: ONNX Runtime execution providers, CPU only by default.
        num_threads: intra-op threads of the session; 0 lets ONNX Runtime choose.
    """

    def __init__(self, path: str, providers: Sequence[str] = ("CPUExecutionProvider",), num_threads: int = 0):
        super().__init__()
        import onnxruntime as ort  # optional dependency: only this config needs it

        options = ort.SessionOptions()
        options.intra_op_num_threads = int(num_threads)
        self.path = str(path)
        self.session = ort.InferenceSession(self.path, sess_options=options, providers=list(providers))
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plain = x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)  # MetaTensor -> Tensor
        array = np.ascontiguousarray(plain.detach().cpu().numpy(), dtype=np.float32)
        out = self.session.run([self.output_name], {self.input_name: array})[0]
        return torch.from_numpy(out).to(device=x.device, dtype=torch.float32)

    def extra_repr(self) -> str:
        return f"path={self.path!r}, input={self.input_name!r}, output={self.output_name!r}"
