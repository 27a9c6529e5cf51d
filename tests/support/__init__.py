"""Helpers and rank workers shared by the tests (import as ``tests.support.<module>``)."""
