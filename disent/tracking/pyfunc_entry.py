"""The entry MLflow runs to build a run's model ("models from code"): see disent.tracking.pyfunc."""
import mlflow

from disent.tracking.pyfunc import DisentPyfunc

mlflow.models.set_model(DisentPyfunc())
