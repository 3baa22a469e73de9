"""The control plane: the coordinator, its client, the message schema and the parity rules."""
