"""fleetgate: an SSH gateway that wakes the machine you log in to and stops it when idle."""

__version__ = "0.1.0"
