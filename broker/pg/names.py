"""Names the broker gives inside every node: its roles, the application database and
the schema extensions go into."""

from __future__ import annotations

ADMIN_USER = "postgres"
REPLICATION_USER = "pgha_replicator"
APP_DATABASE = "appdb"
APP_OWNER = "app_owner"
READ_ONLY_GROUP = "app_reader"
# Read-only roles of earlier versions were members of this built-in role, which also
# reads the catalogs (pg_authid): the tenant model moves them to READ_ONLY_GROUP.
LEGACY_READ_ONLY_GROUP = "pg_read_all_data"
# Owned by the broker, USAGE for everyone: extension scripts run as superuser with
# this schema on their search_path, so no tenant may create anything in it.
EXTENSION_SCHEMA = "extensions"
