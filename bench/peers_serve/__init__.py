"""What the peer servers of bench.peers run inside their own virtual environments: the same
ONNX graph, decode and preprocessing as the service (modelcard.preprocessing), wrapped in each
peer's documented model interface. Only numpy, Pillow, pydantic and onnxruntime are needed
from this folder (plus the peer's own package); nothing here imports the service."""
