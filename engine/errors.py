"""Errors the engine raises for a client's mistake (mapped to HTTP 4xx)."""


class RequestError(ValueError):
    """A request the engine cannot serve as given; `param` names the field."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
