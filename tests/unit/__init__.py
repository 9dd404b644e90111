"""Unit tests: in the pytest process, no servers, no processes of their own (DataLoader workers aside)."""
