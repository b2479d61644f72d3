"""The one family of user errors.

Anything a user can fix (a flag, a file, a folder) raises a subclass of `LlavaError`.
The command-line tools print its message on one line, without a traceback, and exit 2.
"""


class LlavaError(Exception):
    """A user error whose message names what to fix."""


class ArtifactError(LlavaError):
    """The artifact folder is missing a file, is truncated, or has an unknown format."""


class SourceError(LlavaError):
    """The model source (folder or hub id) cannot be read as a LLaVA model."""


class ImageError(LlavaError):
    """An image file is missing, empty, truncated, not an image, or too large."""


class PromptError(LlavaError):
    """A prompt (or prompt plus answer) does not fit the model or the backend, or its <image>
    placeholders do not match the images."""


class EngineError(LlavaError):
    """No TensorRT engine matches this GPU and TensorRT version, an engine cannot be built, or a
    backend cannot take the call (a batch over its limit, a closed backend)."""
