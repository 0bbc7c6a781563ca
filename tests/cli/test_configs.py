"""Every config in recbench/conf/ composes and instantiates (the folders are the registries)."""
from __future__ import annotations

from pathlib import Path

import pytest
from recbench.runs.config import compose

from recbench.runs.settings import instantiate_without
from recbench.runs.config import CONFIG_DIR
from recbench.methods.base import CompressionMethod


def names(group):
    return sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))


def composed(*overrides):
    return compose(list(overrides))


@pytest.mark.parametrize("dataset", names("dataset"))
def test_every_dataset_config_composes_and_instantiates(dataset):
    cfg = composed(f"dataset={dataset}")
    protocol = instantiate_without(cfg.dataset)
    assert hasattr(protocol, "prepare") and hasattr(protocol, "settings")
    for key in ("batch_size", "embedding_dim", "bottom_mlp", "top_mlp", "dense_learning_rate",
                "embedding_learning_rate", "max_epochs", "evals_per_epoch", "patience"):
        assert key in cfg.dataset.protocol, f"recbench/conf/dataset/{dataset}.yaml: protocol.{key} missing"


@pytest.mark.parametrize("method", names("method"))
def test_every_method_config_names_its_file_and_class(method):
    cfg = composed(f"method={method}")
    assert cfg.method.name == method, f"recbench/conf/method/{method}.yaml must have name: {method}"
    instance = instantiate_without(cfg.method, drop=())
    assert isinstance(instance, CompressionMethod) and instance.name == method
    card = Path(CONFIG_DIR).parents[1] / "methods" / f"{method}.md"
    assert card.is_file(), f"method card {card} missing"


@pytest.mark.parametrize("model", names("model"))
def test_every_model_config_composes(model):
    cfg = composed(f"model={model}")
    assert cfg.model.name == model


def test_unknown_names_get_a_clear_error():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="nosuchmethod"):
        composed("method=nosuchmethod")
    with pytest.raises(ConfigCompositionException, match="Available options"):
        composed("dataset=nosuchdata")


@pytest.mark.parametrize("experiment", names("experiment"))
def test_every_experiment_composes(experiment):
    cfg = composed(f"experiment={experiment}")
    assert cfg.model.embedding_dim > 0


@pytest.mark.parametrize("launcher", names("hydra/launcher"))
def test_cluster_launcher_configs_compose(launcher):
    cfg = compose([f"hydra/launcher={launcher}"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.startswith("hydra_plugins.")
