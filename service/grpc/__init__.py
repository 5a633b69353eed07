"""The Open Inference Protocol over gRPC (``inference.GRPCInferenceService``).

``grpc_predict_v2.proto`` is the interface; the ``*_pb2*`` modules beside it are generated
from it and shipped (grpcio-tools 1.85.1, protobuf gencode 7.35.1), so a checkout, a wheel and
the slim runtime image need no protoc. Regenerate after editing the .proto, from the repo
root::

    python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. \\
        service/grpc/grpc_predict_v2.proto

Its messages share full names (``inference.*``) with tritonclient's own generated modules:
never import both into one process (the protobuf descriptor pool refuses duplicate symbols).
"""
