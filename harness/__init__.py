"""What the tests (through tests/support) and the benchmarks share: the local cloud's
machine and leak checks, the failover environment, workflows run to the end, the
writing app, faults and waiting for what a user would see."""
