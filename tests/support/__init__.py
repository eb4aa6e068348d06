"""The tests' pytest fixtures, one module per real part (`pg`, `local`, `openstack`),
the API client (`api`) and the "HA instance under write load" fixture (`load`). The
helpers the benchmarks share live in the top-level `harness` package."""
