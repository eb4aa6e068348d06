"""A worker process that runs every operation of one instance until none is left:

    python -m tests.crash_worker STATE_URL KEY CLOUD_JSON INSTANCE_ID

With BROKER_CRASH_AFTER_STEP=kind:step it SIGKILLs itself right after that step of
whichever operation reaches it (a failover's rebuild, say), before the step is
recorded; killed from outside, it dies wherever it is. Exits 0 once the instance has
no unfinished operation, 1 after three minutes."""

from __future__ import annotations

import sys
import time

from broker.store.models import UNFINISHED, Operation
from harness.workflows import cloud_from_json, make_engine, make_runtime

TIMEOUT = 180.0


def main(argv: list[str]) -> int:
    state_url, key, cloud_text, instance_id = argv
    runtime = make_runtime(state_url, key, cloud_from_json(cloud_text))
    engine = make_engine(runtime)
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        with runtime.store.session() as s:
            left = s.query(Operation).filter(Operation.instance_id == instance_id,
                                             Operation.state.in_(UNFINISHED)).count()
        if not left:
            return 0
        if engine.run_pending() == 0:
            time.sleep(0.05)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
