"""Generated protobuf and gRPC modules of rebalancer.v1 (regenerate with `make protos`)."""
