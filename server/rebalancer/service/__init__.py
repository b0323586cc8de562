"""The gRPC product around the solver library: `rebalancer-server`.

main (flags, signals) -> server (assembly) -> servicer (thin RPC handlers) -> deployments (versions,
watchers) -> batcher (one solver worker) / telemetry (windows) / store (SQLite); metrics and
interceptors export what happens.
"""
