"""The test suite (imported before its conftest and any test module).

``nox -s tests`` runs workers beside each other on the machine's cores, and each starts
servers with threads of their own: OpenMP threads that wait for work sleep instead of
spinning, so they do not take the cores from a neighbour's passes. Set here, before
torch is imported, for the test processes and every process they start.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
