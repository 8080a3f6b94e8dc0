"""The code MLflow runs to load an M2D2 pyfunc model ("models from code": nothing is unpickled); see
:mod:`m2d2.serving`."""

from mlflow.models import set_model

from m2d2.serving import M2D2PyFunc

set_model(M2D2PyFunc())
