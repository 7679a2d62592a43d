"""Plumbing shared by every role process: gRPC server set-up, metrics, ready files."""
