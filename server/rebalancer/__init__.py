"""moe-rebalancer: expert placement for Mixture-of-Experts inference clusters.

`rebalancer.solver` is the library (no gRPC, no metrics, no SQLite); `rebalancer.service` is the gRPC
product built around it.
"""

__version__ = "0.1.0"
