"""Which Python warnings reach an operator's terminal or journal.

Why: a dependency's deprecation notice (cryptography 51 deprecating DSA, raised from inside
asyncssh at import time) is addressed to that dependency's maintainers, not to the person
running `fleetgate check`. Printed on every command, it buries fleetgate's own lines and
breaks anything that reads stderr. So the command line ignores deprecation-style warnings
attributed to modules outside fleetgate; fleetgate's own warnings, and every other kind of
warning, still show. The test suite does the opposite for our code: pyproject.toml turns
warnings raised by fleetgate's modules into errors, so ours get fixed rather than hidden.
"""

from __future__ import annotations

import warnings

# Deprecation-style categories only. cryptography's CryptographyDeprecationWarning derives
# from UserWarning, so it is named by its class name, matched without importing cryptography.
_CATEGORIES: tuple[type[Warning], ...] = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)
_NOT_FLEETGATE = r"(?!fleetgate(\.|$))"


def quiet_dependencies() -> None:
    """Install the entry point's filters; call before anything imports a dependency."""
    for category in _CATEGORIES:
        warnings.filterwarnings("ignore", category=category, module=_NOT_FLEETGATE)
    try:
        from cryptography.utils import CryptographyDeprecationWarning
    except ImportError:  # pragma: no cover - cryptography is a dependency of asyncssh
        return
    warnings.filterwarnings("ignore", category=CryptographyDeprecationWarning, module=_NOT_FLEETGATE)
