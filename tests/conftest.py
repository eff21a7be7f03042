"""Test-wide settings. Imported before any test module, so child processes (ray start, Ray workers, ray job
submit) inherit the environment set here."""

import os

# Ray resolves 127.0.0.1 to the host's primary interface address unless "cluster mode" is off; with it off,
# every Ray process of a test (GCS, raylet, workers, metrics agent, service-discovery file) stays on loopback.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
