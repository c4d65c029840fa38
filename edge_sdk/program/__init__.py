"""Edge programs: ONNX graphs the cloud compiles (``compile``, needs torch) and devices run with onnxruntime
and numpy (``format``, ``optim``, ``runner``: torch-free). See docs/EDGE_RUNTIME.md."""
