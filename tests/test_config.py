"""configs/*.yaml: valid Ray Serve configs whose args are valid AppConfigs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from serve_app.cli.serve_file import load_serve_file
from serve_app.config import AppConfig
from serve_app.deployments.app import deployment_options, resolve_paths

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", ["dev", "local", "gpu"])
def test_configs_are_valid(name):
    path = CONFIGS / f"{name}.yaml"
    ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    serve_file = load_serve_file(path)
    assert serve_file.raw["applications"][0]["name"] == "photoenhance"
    assert serve_file.raw["applications"][0]["import_path"] == "serve_app.deployments.app:build_app"
    model, ingress = deployment_options(serve_file.app)
    assert model["max_ongoing_requests"] >= serve_file.app.batching.max_batch_size
    assert ingress.get("num_replicas", 0) >= 1 or ingress["autoscaling_config"]["min_replicas"] >= 1


def test_dev_is_cpu_tiny_synthetic():
    app = load_serve_file(CONFIGS / "dev.yaml").app
    assert app.weights.source == "synthetic" and app.weights.profile == "tiny"
    assert app.engine.device == "cpu"
    assert deployment_options(app)[0]["ray_actor_options"]["num_gpus"] == 0


def test_gpu_autoscales_on_one_gpu_per_replica():
    app = load_serve_file(CONFIGS / "gpu.yaml").app
    assert app.weights.source == "official" and app.engine.half
    model, _ = deployment_options(app)
    assert model["ray_actor_options"]["num_gpus"] == 1
    scaling = model["autoscaling_config"]
    assert scaling["min_replicas"] == 1 and scaling["max_replicas"] > 1
    assert scaling["upscale_delay_s"] == app.model.autoscaling.upscale_delay_s


def test_local_weights_auto():
    assert load_serve_file(CONFIGS / "local.yaml").app.weights.source == "auto"


def test_relative_paths_resolve(tmp_path):
    app = AppConfig.model_validate({"weights": {"dir": "w"}, "jobs": {"data_dir": "d"}})
    resolved = resolve_paths(app, base=tmp_path)
    assert resolved.weights.dir == tmp_path / "w" and resolved.jobs.data_dir == tmp_path / "d"


def test_unknown_keys_refused():
    with pytest.raises(ValueError):
        AppConfig.model_validate({"limits": {"max_byts": 1}})


def test_ingress_autoscales_only_when_asked():
    fixed = AppConfig.model_validate({"ingress": {"num_replicas": 2}})
    assert deployment_options(fixed)[1]["num_replicas"] == 2
    scaled = AppConfig.model_validate(
        {"ingress": {"num_replicas": 2, "max_replicas": 6, "target_ongoing_requests": 16}}
    )
    ingress = deployment_options(scaled)[1]
    assert "num_replicas" not in ingress
    assert ingress["autoscaling_config"] == {
        "min_replicas": 2, "max_replicas": 6, "target_ongoing_requests": 16
    }
    with pytest.raises(ValueError, match="max_replicas"):
        AppConfig.model_validate({"ingress": {"num_replicas": 3, "max_replicas": 2}})


def test_codec_threads_follow_the_model_cpus():
    assert AppConfig.model_validate({"model": {"num_cpus": 6}}).model.codec_pool_size() == 6
    assert AppConfig.model_validate({"model": {"num_cpus": 0.5}}).model.codec_pool_size() == 1
    cfg = AppConfig.model_validate({"model": {"num_cpus": 6, "codec_threads": 3}})
    assert cfg.model.codec_pool_size() == 3
