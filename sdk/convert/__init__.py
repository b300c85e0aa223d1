"""Model format conversions (ONNX to TFLite), each checked against onnxruntime."""
