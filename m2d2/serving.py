"""An MLflow model flavour for M2D2 exports: ``mlflow.pyfunc.load_model("models:/m2d2@champion")`` and
``mlflow models serve`` work on every registered version.

The model is a pyfunc defined by code (``m2d2/mlflow_model.py``, MLflow's "models from code"), so loading it runs
this package's code and unpickles nothing; the export directory travels as the model's artifact ``export``.

Input: a table (pandas DataFrame, or the scoring server's ``dataframe_records``) with one clip or caption per row:

- ``audio``: a 16-kHz mono waveform (floats in [-1, 1]); ``sample_rate`` may say which rate it is, anything but
  16000 is refused (resample first: ``m2d2.audio.load_audio`` does);
- ``path``: an audio file, read only under ``$M2D2_SERVING_AUDIO_ROOT`` (a server must not read any file a caller
  names; without the variable, paths are refused);
- ``text``: a caption (CLAP text embedding).

The ``output`` parameter picks what comes back per row: ``clap`` (default; audio or text), ``clip`` (the 3840-d
clip features of audio) or ``frames`` (frame features with their timestamps in seconds). Bad input (wrong rate,
empty or non-finite audio, a file that is not audio, a row with nothing or two things) is an
``MlflowException`` with ``INVALID_PARAMETER_VALUE``: the scoring server answers 400 with the message.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any

import mlflow.pyfunc
from mlflow.exceptions import MlflowException
from mlflow.models.signature import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types.schema import Array, ColSpec, ParamSchema, ParamSpec, Schema

__all__ = ["AUDIO_ROOT_ENV", "OUTPUTS", "SIGNATURE", "M2D2PyFunc", "save_pyfunc"]

OUTPUTS = ("clap", "clip", "frames")
AUDIO_ROOT_ENV = "M2D2_SERVING_AUDIO_ROOT"
SAMPLE_RATE = 16000
MODEL_CODE = Path(__file__).with_name("mlflow_model.py")

SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec(Array("double"), "audio", required=False), ColSpec("long", "sample_rate", required=False),
                   ColSpec("string", "path", required=False), ColSpec("string", "text", required=False)]),
    outputs=Schema([ColSpec(Array("double"), "embedding", required=False),
                    ColSpec(Array(Array("double")), "frames", required=False),
                    ColSpec(Array("double"), "timestamps", required=False)]),
    params=ParamSchema([ParamSpec("output", "string", "clap")]),
)


def _bad(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def _present(value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, float) and math.isnan(value):
        return False
    return not (isinstance(value, str) and value == "")


class M2D2PyFunc(mlflow.pyfunc.PythonModel):
    """The pyfunc of one M2D2 export (see the module docstring for inputs and outputs)."""

    def load_context(self, context) -> None:
        from m2d2.inference import Embedder

        self.embedder = Embedder.from_pretrained(context.artifacts["export"])

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        import pandas as pd

        output = (params or {}).get("output", "clap")
        if output not in OUTPUTS:
            raise _bad(f"output={output!r}: choose one of {', '.join(OUTPUTS)}")
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if frame.empty:
            raise _bad("no rows: give one clip ('audio' or 'path') or caption ('text') per row")
        rows = [self._row(i, row, output) for i, row in enumerate(frame.to_dict("records"))]
        return pd.DataFrame(rows)

    def _row(self, index: int, row: dict[str, Any], output: str) -> dict[str, Any]:
        given = [k for k in ("audio", "path", "text") if _present(row.get(k))]
        if len(given) != 1:
            raise _bad(f"row {index}: give exactly one of 'audio', 'path' or 'text', got {given or 'none'}")
        if given == ["text"]:
            if output != "clap":
                raise _bad(f"row {index}: text has CLAP embeddings only (output='clap'), not {output!r}")
            return {"embedding": self.embedder.clap_text([str(row["text"])])[0].double().tolist()}
        wave = self._wave(index, row)
        try:
            if output == "clap":
                return {"embedding": self.embedder.clap_audio([wave])[0].double().tolist()}
            if output == "clip":
                return {"embedding": self.embedder.clip_features([wave])[0].double().tolist()}
            (frames,) = self.embedder.frames([wave])
        except ValueError as exc:  # e.g. shorter than one analysis window
            raise _bad(f"row {index}: {exc}") from None
        return {"frames": frames.features.double().tolist(), "timestamps": frames.timestamps.double().tolist()}

    def _wave(self, index: int, row: dict[str, Any]):
        import numpy as np
        import torch

        from m2d2.audio.decode import AudioDecodeError, load_audio

        if _present(row.get("path")):
            root = os.environ.get(AUDIO_ROOT_ENV)
            if not root:
                raise _bad(f"row {index}: file paths are read only under ${AUDIO_ROOT_ENV}, which is not set; "
                           "send the waveform as 'audio' instead")
            from m2d2 import io

            try:
                path = io.confine(root, str(row["path"]), "path")
            except ValueError as exc:
                raise _bad(f"row {index}: {exc}") from None
            try:
                return load_audio(path, SAMPLE_RATE)
            except (AudioDecodeError, FileNotFoundError, OSError) as exc:
                raise _bad(f"row {index}: {row['path']}: not usable audio ({exc})") from None
        rate = row.get("sample_rate")
        if _present(rate) and int(rate) != SAMPLE_RATE:
            raise _bad(f"row {index}: sample_rate={int(rate)}; the model takes {SAMPLE_RATE} Hz mono audio "
                       "(resample first)")
        try:
            wave = np.asarray(row["audio"], dtype=np.float32)
        except (TypeError, ValueError):
            raise _bad(f"row {index}: 'audio' must be a list of numbers") from None
        if wave.ndim != 1 or wave.size == 0:
            raise _bad(f"row {index}: 'audio' must be a non-empty 1-D waveform, got shape {wave.shape}")
        if not np.isfinite(wave).all():
            raise _bad(f"row {index}: 'audio' holds NaN or infinite samples")
        return torch.from_numpy(wave)


def save_pyfunc(export_dir: str | Path, path: str | Path) -> Path:
    """Write the MLflow model of ``export_dir`` (a local ``save_pretrained`` directory) to ``path``."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        requirement = f"m2d2=={version('m2d2')}"
    except PackageNotFoundError:
        requirement = "m2d2"
    with warnings.catch_warnings():  # its hints on type-hinted predict and input examples: the signature is declared
        warnings.filterwarnings("ignore", category=UserWarning, module="mlflow")
        mlflow.pyfunc.save_model(path=str(path), python_model=str(MODEL_CODE),
                                 artifacts={"export": str(export_dir)}, signature=SIGNATURE,
                                 pip_requirements=[requirement])
    return Path(path)
