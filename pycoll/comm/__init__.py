"""The communicator: collectives over one epoch of the group, agreed retries, shared state,
the switch side and async work."""
