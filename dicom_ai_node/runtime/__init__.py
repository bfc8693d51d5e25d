"""Model runtime: devices and memory, MONAI bundles, bare TorchScript/ONNX models, sliding-window inference
with AMP, Grad-CAM. torch and MONAI are imported here only, so classical pipelines never pay for them."""
