"""Fakes at the wire level (the only kind the project allows): real clients talk to them."""
