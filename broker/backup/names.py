"""Each instance archives into its own pgBackRest stanza, named after its id. Instance
ids come from the platform and may hold any character: the stanza is a digest of it,
a name safe in a path and in an object store key."""

from __future__ import annotations

import hashlib


def stanza(instance_id: str) -> str:
    return "pgha-" + hashlib.sha256(instance_id.encode()).hexdigest()[:24]
