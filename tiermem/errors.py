"""Errors raised by tiermem. Every message says what is wrong and what to do about it."""


class TiermemError(Exception):
    """Base class of every error tiermem raises on purpose."""


class ConfigError(TiermemError):
    """A model config, budget string or option is invalid or unsupported."""


class UnsupportedArchitectureError(ConfigError):
    """The checkpoint's architecture is not one tiermem implements."""


class NotResidentError(ConfigError):
    """CUDA graphs were asked for where the placement streams blocks (they replay kernels, not copies)."""


class WeightsError(TiermemError):
    """Weights are missing, unexpected, or of the wrong shape or dtype."""


class StoreError(TiermemError):
    """A block store is unreadable: bad manifest, missing or truncated file."""


class ChecksumError(StoreError):
    """Stored bytes do not match the checksum recorded when they were written."""


class PackError(TiermemError):
    """Converting a checkpoint into a block store failed."""


class BudgetError(TiermemError):
    """A memory budget is too small for what must be resident at once."""


class TierIOError(TiermemError):
    """Reading or writing a block failed in an I/O backend."""


class CheckpointError(TiermemError):
    """Saving, loading or verifying a checkpoint failed."""


class NotACheckpointError(CheckpointError):
    """The path holds no tiermem checkpoint at all (nothing there, an unfinished save, another kind of file)."""
