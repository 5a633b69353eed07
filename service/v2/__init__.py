"""The Open Inference Protocol (KServe V2) with Triton's extensions, as pure functions.

Nothing here knows how the engine is reached: the routes hand this package request bytes and
get a typed request back, hand it logits and get response bytes back. It depends on numpy,
pydantic and the model card only, so it can be tested without a server or ONNX Runtime.

- ``signature``: the model's one input and one output in the protocol's terms, from its card;
- ``errors``: the typed errors and the protocol's error body ``{"error": "<string>"}``;
- ``tensors``: datatype names and the BYTES wire format;
- ``request``: ``/infer`` bodies (JSON and binary) -> :class:`request.InferRequest`;
- ``response``: logits -> ``/infer`` response bodies (JSON and binary, classification);
- ``metadata``: server/model metadata, Triton model configuration, repository index;
- ``stats``: Triton's statistics extension from plain counters.
"""
