"""Errors a user can act on. Command-line entry points print them as one line and exit 2."""


class SlowftError(Exception):
    """Bad input or an environment problem: the message names the file or flag and what was expected."""


class NonFiniteError(Exception):
    """A NaN/inf loss or gradient; raised before the poisoned update reaches the disk."""


class Interrupted(Exception):
    """Ctrl-C / SIGTERM: the state on disk was made consistent before this was raised."""


class Diverged(Exception):
    """Training went wrong without a NaN: the loss came back to ln(vocab), a uniform output."""


class RankLost(Exception):
    """Data-parallel: another rank died or stopped answering. Each rank's work dir stays consistent."""


class RanksDiverged(Exception):
    """Data-parallel: the ranks' weights are no longer the same."""
