"""Test app of the fault tests: a message type whose rendering always fails."""
