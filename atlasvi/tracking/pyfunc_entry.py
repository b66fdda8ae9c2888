"""MLflow's entry to an atlasvi model logged from code (`mlflow_model.log_latent_model`): the pyfunc it loads."""

from mlflow.models import set_model

from atlasvi.tracking.mlflow_model import LatentModel

set_model(LatentModel())
