"""The container image built and run by scripts/container-test, and its helpers."""
