"""The metrics of `vidu eval`, one module each, with its protocol in the module docstring."""


class EvalError(ValueError):
    """Unusable input or a model folder that cannot be used: one line for the user (exit 2)."""


NOT_ASSESSED = "not_assessed"
