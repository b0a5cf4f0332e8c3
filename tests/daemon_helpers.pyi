"""mypy's view of ``daemon_helpers``, which the daemon tests import by bare name (pytest puts
tests/daemon/ on sys.path for its conftest.py). mypy checks that folder as the namespace package
``daemon`` instead, so that tests/daemon/conftest.py is ``daemon.conftest`` and not a second
top-level ``conftest`` (mypy stops at duplicate module names); hence this alias. Python never
imports a .pyi file, so it changes nothing at run time."""

from daemon.daemon_helpers import *  # noqa: F403 - the whole module, under its bare name

# daemon_helpers.py imports it from helpers.py for the tests (an implicit re-export to mypy):
from helpers import wait_until as wait_until
