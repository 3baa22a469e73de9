"""The network: the peer mesh (handshakes, listeners, connections) and link tuning (stripes, buffers)."""
