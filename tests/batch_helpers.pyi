"""mypy's view of ``batch_helpers``, which the batch tests import by bare name (pytest puts
tests/batch/ on sys.path for its conftest.py). mypy checks that folder as the namespace package
``batch`` instead, so that tests/batch/conftest.py is ``batch.conftest`` and not a second
top-level ``conftest`` (mypy stops at duplicate module names); hence this alias. Python never
imports a .pyi file, so it changes nothing at run time."""

from batch.batch_helpers import *  # noqa: F403 - the whole module, under its bare name

# batch_helpers.py imports these from helpers.py for the tests (implicit re-exports to mypy):
from helpers import alive as alive
from helpers import wait_until as wait_until
