"""What client and server share on the wire: the generated `rebalancer.v1` stubs (`v1/`), the tensor
codec, the topology type and the declaration of every solve option. Imports neither side, nor torch."""
