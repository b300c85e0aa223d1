"""An ONNX graph run as a torch module (`interpreter`, with its op table `ops`): what the
training passes (distillation, block reconstruction) differentiate through. Not a pass."""
