"""The engine process's side: the ONNX Runtime session and how it is chosen (``policy``,
``plan``, ``session``, ``runners``, ``model``), the dynamic batcher, and the server that feeds
it from the ingress workers (``server``). Only this package imports onnxruntime."""
