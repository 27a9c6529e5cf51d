"""Tests of ds_spngd (tests/optimizer), its engine integrations (tests/integrations) and the lab (tests/lab);
shared helpers in tests/support."""
