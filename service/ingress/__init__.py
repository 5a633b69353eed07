"""The ingress worker processes: HTTP, API key, limits, body reading, decode and preprocessing.
They never import onnxruntime: the engine process runs the model (:mod:`service.engine`)."""
