"""What the libraries Grove drives print on their own, kept out of a run's log unless Grove logs at
DEBUG (``--log_level 0``): lines that are not about the user's model, or advise what Grove has
already done. An encoder run printed a dozen of them among its own lines:

- torch's ONNX exporter: "torchvision is not installed. Skipping torchvision::nms" (Grove exports
  no vision ops), and Python warnings about its dynamic axis names and a deprecated pytree check;
- onnxruntime's C++ logger: "Removing initializer 'val_49'. It is not used by any node", for
  constants the dynamo exporter leaves behind (onnxruntime drops them itself);
- onnxruntime's quantizer: "Please consider to run pre-processing before quantization", when Grove
  has run onnxruntime's graph optimization before quantizing.

Errors still reach the log, and so do the libraries' progress bars (a 7B model's load is long)."""

from __future__ import annotations

import logging
import warnings

__all__ = ["quiet_libraries"]

_ADVICE_GROVE_FOLLOWS = ("Please consider to run pre-processing before quantization",)
_quieted = False


def _not_advice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(_ADVICE_GROVE_FOLLOWS)


def quiet_libraries() -> None:
    """Once per process, unless the ``grove`` logger is at DEBUG: silence the lines above."""
    global _quieted
    if _quieted or logging.getLogger("grove").getEffectiveLevel() <= logging.DEBUG:
        return
    _quieted = True
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"copyreg|torch\.")
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    logging.getLogger().addFilter(_not_advice)  # the quantizer logs through the root logger
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)  # errors only
