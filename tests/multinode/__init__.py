"""Tests on a real two-node Ray cluster on this machine: placement across nodes, synchronized statistics, node loss."""
