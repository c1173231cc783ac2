"""Export of the trained model to ONNX, its evaluation with onnxruntime, and the int8 variant."""
