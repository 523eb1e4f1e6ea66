"""Export layer: targets and device signatures, backend runners, ONNX export,
engine build, the parity gate and the release manifest.

Imports only from the pipeline core (config, plan, compact, io, errors), never
from ``profiling`` or the pipeline stages. Heavy optional backends (TensorRT,
CUDA) are imported inside the functions that need them.
"""
