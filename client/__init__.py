"""The Python client library and ckptctl (talks to ckptd only over gRPC)."""
