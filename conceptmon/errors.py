"""One base class for every error a user can cause: the CLI turns these into one line and exit 1."""


class ConceptmonError(Exception):
    """Bad input or a missing prerequisite, described in one line that names what to fix."""
