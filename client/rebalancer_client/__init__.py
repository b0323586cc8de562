"""Python client of the moe-rebalancer service; needs numpy and grpcio, never torch."""
