"""The Open Inference Protocol over gRPC (``inference.GRPCInferenceService``).

``grpc_predict_v2.proto`` is the interface and ``rpc_status.proto`` the rich error model;
``protocol.binpb`` beside them is both compiled into a ``FileDescriptorSet``, shipped, and
loaded at run time into a descriptor pool of this package's own (:mod:`service.grpc.protocol`).
No generated Python is shipped and nothing is generated at install, so a checkout, a wheel and
the slim runtime image need no protoc, and no gencode/runtime version pair can disagree. The
own pool is why: the messages share full names (``inference.*``) with tritonclient's generated
modules, and generated modules register in protobuf's default pool, which refuses a second
``inference.DataType``; in a pool of its own the service's messages and tritonclient's live in
one process. Regenerate after editing a .proto, from the repository root (a test checks that
the shipped file matches)::

    python -m grpc_tools.protoc -I . --descriptor_set_out=service/grpc/protocol.binpb \\
        service/grpc/grpc_predict_v2.proto service/grpc/rpc_status.proto
"""
