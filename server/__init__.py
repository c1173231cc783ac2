"""The inference service: Starlette + onnxruntime, NumPy/Pillow preprocessing, no torch."""
