"""What the tests and the benchmarks share: synthetic loads and placement scores (`workloads`), a server
subprocess on loopback (`serving`) and the engines' released wheels (`wheels`). Installed by the `dev` setup
(`make install`), not in the server image."""
