"""Backups and point-in-time restore with pgBackRest: the names the broker gives each
instance's repository (`names.py`)."""
